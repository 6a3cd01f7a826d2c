"""All EasyEdit glue in one place: register MEMoE with an EasyEdit checkout.

EasyEdit has no plugin API; it dispatches through three objects, which are
changed in place so that every module that imported them sees MEMoE:

* ``easyeditor.util.alg_dict.ALG_DICT``: ``"MEMoE" -> apply_memoe_to_model``;
* ``easyeditor.editors.utils.CALLABLE_RESTORE_ALGS``: our apply returns a restore callable;
* ``easyeditor.editors.batch_editor.BatchEditor.is_batchable_method``: wrapped to accept MEMoE.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

from ..hparams import ALG_NAME
from ..apply import apply_memoe_to_model


class EasyEditNotFoundError(ImportError):
    """No usable EasyEdit checkout could be imported."""


def add_easyedit_path(path: Optional[str] = None) -> Optional[str]:
    """Put an EasyEdit checkout (``path`` or ``$EASYEDIT_PATH``) first on ``sys.path``."""
    path = path or os.environ.get("EASYEDIT_PATH")
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(os.path.join(path, "easyeditor")):
        raise EasyEditNotFoundError(f"{path} has no easyeditor/ folder; point EASYEDIT_PATH (or --easyedit) at "
                                    "the root of an EasyEdit checkout (git clone https://github.com/zjunlp/EasyEdit)")
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def register(easyedit_path: Optional[str] = None) -> None:
    """Register MEMoE with EasyEdit (idempotent); raise EasyEditNotFoundError saying why not."""
    add_easyedit_path(easyedit_path)
    try:
        alg_dict = importlib.import_module("easyeditor.util.alg_dict")
        editor_utils = importlib.import_module("easyeditor.editors.utils")
        batch_editor = importlib.import_module("easyeditor.editors.batch_editor")
    except ImportError as err:
        raise EasyEditNotFoundError(
            f"cannot import EasyEdit ({type(err).__name__}: {err}). MEMoE registers with a source checkout of "
            "https://github.com/zjunlp/EasyEdit: set EASYEDIT_PATH to its root (or put it on sys.path) and "
            "install its requirements.txt. The PyPI package 'easyeditor' is an old snapshot that does not work.") from err
    missing = [name for name, obj in (("ALG_DICT", getattr(alg_dict, "ALG_DICT", None)),
                                      ("CALLABLE_RESTORE_ALGS", getattr(editor_utils, "CALLABLE_RESTORE_ALGS", None)),
                                      ("BatchEditor", getattr(batch_editor, "BatchEditor", None))) if obj is None]
    if missing:
        raise EasyEditNotFoundError(f"this EasyEdit has no {missing}; MEMoE needs a current EasyEdit checkout")

    alg_dict.ALG_DICT[ALG_NAME] = apply_memoe_to_model
    editor_utils.CALLABLE_RESTORE_ALGS.add(ALG_NAME)
    batch_cls = batch_editor.BatchEditor
    current = batch_cls.__dict__["is_batchable_method"].__func__
    if not getattr(current, "_memoe_wrapped", False):
        def is_batchable_method(alg_name: str, _original=current):
            return alg_name == ALG_NAME or _original(alg_name)
        is_batchable_method._memoe_wrapped = True
        type.__setattr__(batch_cls, "is_batchable_method", staticmethod(is_batchable_method))


def is_registered() -> bool:
    module = sys.modules.get("easyeditor.util.alg_dict")
    return module is not None and getattr(module, "ALG_DICT", {}).get(ALG_NAME) is apply_memoe_to_model


def register_if_available() -> Optional[str]:
    """Called on ``import memoe_plugin``: register when EasyEdit is importable.

    Returns None on success or when no EasyEdit is in sight, else the reason it
    failed (the caller warns with it).
    """
    if "easyeditor" not in sys.modules and not os.environ.get("EASYEDIT_PATH"):
        if importlib.util.find_spec("easyeditor") is None:
            return None
    try:
        register()
    except EasyEditNotFoundError as err:
        return str(err)
    return None
