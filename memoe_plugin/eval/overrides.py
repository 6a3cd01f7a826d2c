"""``key=value`` settings from the command line, parsed once for every command."""
from __future__ import annotations

import contextlib
from typing import Iterable

import yaml


class OverrideError(ValueError):
    """A ``key=value`` item that cannot be read."""


def parse_value(text: str):
    """A YAML value; ``1e-3`` (a string to PyYAML) becomes a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    return value


def parse_assignments(items: Iterable[str]) -> dict:
    """``["lr=1e-3", "steps=80"]`` -> ``{"lr": 0.001, "steps": 80}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OverrideError(f"{item!r}: expected key=value, e.g. lr=1e-3")
        out[key.strip()] = parse_value(value)
    return out


def parse_method_assignments(items: Iterable[str], known: Iterable[str]) -> dict[str, dict]:
    """``["FT-L.steps=20", "WISE.n_iter=5"]`` -> ``{"FT-L": {"steps": 20}, ...}`` (method names any case)."""
    lookup = {name.lower(): name for name in known}
    out: dict[str, dict] = {}
    for item in items or []:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not key.strip():
            raise OverrideError(f"{item!r}: expected METHOD.key=value, e.g. FT-L.steps=20")
        if method.lower() not in lookup:
            raise OverrideError(f"{item!r}: unknown method {method!r}; known: {', '.join(lookup.values())}")
        out.setdefault(lookup[method.lower()], {})[key.strip()] = parse_value(value)
    return out


def load_hparams(path, items: Iterable[str] = (), **fixed):
    """A MEMoE hparams file (a path or a shipped name) with ``key=value`` overrides and keyword settings
    applied, validated."""
    from ..assets import hparams_file
    from ..hparams import MEMoEHyperParams
    config = MEMoEHyperParams.from_hparams(hparams_file(path)).to_dict()
    config.update(parse_assignments(items))
    config.update({key: value for key, value in fixed.items() if value is not None})
    return MEMoEHyperParams.from_dict(config)
