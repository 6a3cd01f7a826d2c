"""The README's YAML reference, written from the fields of :class:`~.hparams.MEMoEHyperParams` (their help texts)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Union

from .hparams import MEMoEHyperParams, type_name


def reference_table() -> str:
    """The README's YAML reference, one row per field, from the fields' help texts."""
    hints = typing.get_type_hints(MEMoEHyperParams)
    lines = ["| key | type (default) | meaning |", "|---|---|---|"]
    fields = sorted(dataclasses.fields(MEMoEHyperParams), key=lambda f: f.name != "alg_name")
    for f in fields:
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
        kind = " or ".join(type_name(option) for option in options if option is not type(None))
        if f.default is dataclasses.MISSING or f.metadata.get("required"):
            kind += ", required"
        elif f.default is None:
            kind += " (unset)"
        elif isinstance(f.default, bool):
            kind += f" ({str(f.default).lower()})"
        elif isinstance(f.default, str):
            kind += f" (`{f.default}`)"
        else:
            kind += f" ({f.default!r})"
        lines.append(f"| `{f.name}` | {kind} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
