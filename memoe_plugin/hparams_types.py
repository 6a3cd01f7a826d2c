"""How a YAML value is checked against a settings field's type, and how the YAML reference names a type."""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one YAML value against its field type; accept '1e-4'-style strings for floats."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is Literal:
            choices = typing.get_args(option)
            if isinstance(value, bool) and {"on", "off"} <= set(choices):   # YAML 1.1 reads on/off as booleans
                return "on" if value else "off"
            if value in choices and not isinstance(value, bool):
                return value
            continue
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(type_name(o) for o in options)
    raise ValueError(f"{key} = {value!r} ({type(value).__name__}): expected {names}")


def type_name(option) -> str:
    """How the YAML reference and the errors name a field type."""
    if typing.get_origin(option) is Literal:
        values = [f"`{v}`" for v in typing.get_args(option)]
        return "one of " + ", ".join(values)
    return "unset" if option is type(None) else getattr(option, "__name__", str(option))
