"""MEMoE knowledge editing (arXiv 2405.19086) as a plugin for EasyEdit.

``import memoe_plugin`` registers the method with EasyEdit when an EasyEdit
checkout is importable (on ``sys.path`` or at ``$EASYEDIT_PATH``); without one
the package works on its own and :func:`register` says why it cannot register.
"""
import warnings

from .compat import warn_if_untested
from .hparams import MEMoEHyperParams
from .layer import MoEBypass
from .apply import apply_memoe_to_model, remove_memoe
from .adapter import MEMoEAdapter, get_adapter
from .easyedit import EasyEditNotFoundError, register, is_registered, register_if_available
from .persist import EditRemovalError, list_edits, load_adapter, remove_edits, save_adapter

__version__ = "0.2.0"
__all__ = ["MEMoEHyperParams", "MoEBypass", "MEMoEAdapter", "apply_memoe_to_model", "remove_memoe",
           "get_adapter", "save_adapter", "load_adapter", "list_edits", "remove_edits", "EditRemovalError", "register", "is_registered", "EasyEditNotFoundError", "__version__"]

warn_if_untested()
_reason = register_if_available()
if _reason:
    warnings.warn(f"memoe_plugin: EasyEdit found but MEMoE could not be registered: {_reason}", stacklevel=2)
