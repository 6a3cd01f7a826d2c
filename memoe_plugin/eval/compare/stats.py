"""Covariance statistics for ROME-family methods, computed from local text instead of a download."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from .errors import CompareError, MethodUnavailable


class _LocalText:
    """A ``datasets``-like list of ``{"text": ...}`` rows read from a local text file (one sample per line)."""

    def __init__(self, path: Path):
        self.rows = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if not self.rows:
            raise CompareError(f"--stats-text {path}: no non-empty lines")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"text": self.rows[i]}


class _StatsMissing(Exception):
    pass


def _no_progress(iterable, **kwargs):
    return iterable


def stats_file(model, hparams, layer_name: str) -> Path:
    """Where EasyEdit's layer_stats keeps (and looks for) one layer's second moment (mirrors its naming)."""
    model_name = model.config._name_or_path.rsplit("/")[-1]
    return (Path(hparams.stats_dir) / model_name / f"{hparams.mom2_dataset}_stats" /
            f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz")


def ensure_stats(editor, hparams, stats_text: Optional[Path]) -> list[Path]:
    """Make sure EasyEdit finds the covariance stats for every edited layer without downloading.

    Each layer is asked from EasyEdit's own ``layer_stats``; its dataset loader is
    swapped for one that raises (check only) or that reads ``stats_text`` (compute),
    so the file lands exactly where EasyEdit looks for it and holds EasyEdit's own
    ``SecondMoment`` over the inputs of ``rewrite_module_tmp``.
    """
    from easyeditor.models.rome import layer_stats as ls_module
    layers = hparams.layers if hasattr(hparams, "layers") else []
    names = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
    original = ls_module.load_dataset
    files = []
    try:
        for name in names:
            target = stats_file(editor.model, hparams, name)
            files.append(target)

            def missing(*args, **kwargs):
                raise _StatsMissing
            ls_module.load_dataset = missing
            try:
                ls_module.layer_stats(editor.model, editor.tok, name, hparams.stats_dir, hparams.mom2_dataset,
                                      to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                                      precision=hparams.mom2_dtype, hparams=hparams, progress=_no_progress)
                continue
            except _StatsMissing:
                pass
            if stats_text is None:
                raise MethodUnavailable(
                    f"{hparams.alg_name} needs covariance statistics of {name} that EasyEdit computes from "
                    f"Wikipedia, which it downloads; no stats file at {target}. Compute them from local text "
                    "with --stats-text FILE (docs/compare.md)")
            corpus = _LocalText(stats_text)
            ls_module.load_dataset = lambda *args, **kwargs: {"train": corpus}
            print(f"[memoe-compare] computing {hparams.alg_name} covariance statistics for {name} from "
                  f"{stats_text} ({len(corpus)} lines) with EasyEdit's layer_stats -> {target}", file=sys.stderr)
            ls_module.layer_stats(editor.model, editor.tok, name, hparams.stats_dir, hparams.mom2_dataset,
                                  to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                                  precision=hparams.mom2_dtype, hparams=hparams)
            target.with_suffix(".source.json").write_text(json.dumps(
                {"source": str(Path(stats_text).resolve()), "lines": len(corpus),
                 "samples_used": min(len(corpus), int(hparams.mom2_n_samples)),
                 "note": "computed by memoe-compare --stats-text with EasyEdit's layer_stats; "
                         "the file name keeps EasyEdit's mom2_dataset/mom2_n_samples naming"}, indent=2))
    finally:
        ls_module.load_dataset = original
    return files
