"""An EasyEdit method as ``long_stream.py --method`` runs it: its apply function called on each call's edits, as
EasyEdit's sequential ``batch_edit`` calls it, on the same model object, with its shipped file for the sequential
protocol (``memoe_plugin.eval.compare.methods.hparams_path_for``; ``--set`` overrides it). Needs ``EASYEDIT_PATH`` and
EasyEdit's stack (``.venv-easyedit``).
"""
from __future__ import annotations

import time
from typing import Callable


def easyedit_editor(method: str, model, tok, overrides: list[str]) -> tuple[Callable[[list[dict]], float], dict]:
    """``(edit, described)``: ``edit(requests)`` applies one call's edits to ``model`` in place and returns its
    seconds; ``described`` names the method, its file and its alg."""
    import memoe_plugin
    from memoe_plugin.eval.compare.methods import METHODS, hparams_path_for
    from memoe_plugin.eval.overrides import parse_assignments
    memoe_plugin.register()
    import easyeditor
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.util.alg_dict import ALG_DICT
    spec = METHODS[method]
    path = hparams_path_for(method, None, {}, protocol="sequential")
    hparams = getattr(easyeditor, spec.hparams_class).from_hparams(str(path))
    for key, value in parse_assignments(overrides).items():
        setattr(hparams, key, value)
    hparams.device = "cpu"
    apply = ALG_DICT[hparams.alg_name]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for reset_module, attribute, value in spec.reset_before_run:   # module state another run may have left
        import importlib
        setattr(importlib.import_module(reset_module), attribute, value)

    def edit(requests: list[dict]) -> float:
        full = [dict(r, ground_truth="<|endoftext|>", portability={}, locality={}) for r in requests]
        # a batchable method edits the call's requests at once, another one by one (memoe-compare's sequential runs)
        groups = [full] if BatchEditor.is_batchable_method(hparams.alg_name) else [[r] for r in full]
        if len(groups) == 1 and hasattr(hparams, "batch_size"):
            hparams.batch_size = len(full)
        start = time.perf_counter()
        for group in groups:
            apply(model, tok, group, hparams, copy=False, return_orig_weights=False, keep_original_weight=False,
                  train_ds=None)
        return time.perf_counter() - start

    return edit, {"method": method, "file": str(path), "alg_name": hparams.alg_name}
