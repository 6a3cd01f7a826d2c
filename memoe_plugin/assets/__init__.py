"""Files shipped with the package: the hparams YAMLs, the example edits, and the SmolLM2 exporter.

They are package data, found with :mod:`importlib.resources`, so they are there after a plain
``pip install`` as well as in a source checkout (where ``hparams/`` at the repository root
points here).
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

__all__ = ["asset_path", "hparams_path", "memoe_hparams", "hparams_file", "compare_hparams_dir", "example_edits"]


def asset_path(*parts: str) -> Path:
    """The path of a shipped file or folder (the package is installed as plain files, not zipped)."""
    return Path(os.fspath(files(__name__).joinpath(*parts)))


def hparams_path(*parts: str) -> Path:
    """A path inside the shipped ``hparams/`` tree, e.g. ``hparams_path("MEMoE", "gpt2-xl.yaml")``."""
    return asset_path("hparams", *parts)


def memoe_hparams(name: str = "smollm2-135m") -> Path:
    """A shipped MEMoE file by name, with or without ``.yaml``: ``memoe_hparams("llama3-8b")``."""
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = hparams_path("MEMoE", name)
    if not path.is_file():
        shipped = sorted(p.stem for p in hparams_path("MEMoE").glob("*.yaml"))
        raise FileNotFoundError(f"no shipped MEMoE hparams file {name!r}; shipped: {', '.join(shipped)}")
    return path


def hparams_file(name_or_path) -> Path:
    """A MEMoE hparams file given as a path (``.yaml`` optional) or as a shipped name (``gpt2-xl``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file() or path.with_name(path.name + ".yaml").is_file():
        return path
    if path.name == str(name_or_path):      # a bare name: look among the shipped files
        try:
            return memoe_hparams(path.name)
        except FileNotFoundError:
            pass
    return path


def compare_hparams_dir(model: str = "smollm2-135m") -> Path:
    """The shipped baseline hparams for one model, one ``<METHOD>.yaml`` each."""
    return hparams_path("compare", model)


def example_edits() -> Path:
    """The built-in counterfactual edits that ``memoe-edit`` uses by default."""
    return asset_path("example_edits.json")
