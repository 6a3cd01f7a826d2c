"""Everything that depends on how transformers names its internals, in one place.

transformers renames the arguments of ``forward`` between releases: the KV cache
was ``past_key_values`` up to 5.23 and is ``cache`` from 5.24 on, and
``cache_position`` is no longer passed at all. The adapter must know whether a
forward call continues the previous one through a KV cache (``generate`` does
that at every step), so it reads the continuation from what no rename can
change, the attention mask being longer than the new ids, and checks it against
the cache object wherever the cache is found: under any name, positionally, or
as a ``Cache`` instance. When the two disagree, or a cache is there but its
length cannot be read, it raises instead of guessing.

The tested range is :data:`TESTED_TRANSFORMERS` and :data:`TESTED_TORCH`;
:func:`warn_if_untested` says once, at import, when the installed versions lie
outside it.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Optional

import torch

# The range CI tests (.ci/run): EasyEdit's pinned transformers with torch 2.14 (stack 2), and the newest
# releases, pinned in scripts/constraints.txt (stack 1). setup.cfg declares the lower ends.
TESTED_TRANSFORMERS = ("5.5.4", "5.25")
TESTED_TORCH = ("2.14", "2.15")
# Names the KV cache has had in ``forward`` (newest first).
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past", "layer_past")


class CacheNotFollowedError(RuntimeError):
    """A forward call uses a KV cache in a way the adapter cannot follow."""


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def in_range(version: str, bounds: tuple[str, str]) -> bool:
    """``bounds[0] <= version`` and ``version`` no newer than ``bounds[1]`` (compared at its precision)."""
    low, high = version_tuple(bounds[0]), version_tuple(bounds[1])
    v = version_tuple(version)
    return v >= low and v[:len(high)] <= high


def warn_if_untested() -> Optional[str]:
    """Warn once when torch or transformers is outside the tested range; return the message."""
    import transformers
    problems = []
    if not in_range(transformers.__version__, TESTED_TRANSFORMERS):
        problems.append(f"transformers {transformers.__version__} (tested: {TESTED_TRANSFORMERS[0]} to "
                        f"{TESTED_TRANSFORMERS[1]})")
    if not in_range(torch.__version__, TESTED_TORCH):
        problems.append(f"torch {torch.__version__} (tested: {TESTED_TORCH[0]} to {TESTED_TORCH[1]}.x)")
    if not problems:
        return None
    message = ("memoe_plugin was not tested with " + " and ".join(problems) + ". It will try to work; "
               "the tests (python -m pytest) tell whether it does here.")
    warnings.warn(message, stacklevel=3)
    return message


# ----------------------------------------------------------------- the KV cache
def is_cache(value: Any) -> bool:
    """A transformers ``Cache`` object, or the legacy tuple of per-layer (key, value) tensors."""
    if value is None:
        return False
    if hasattr(value, "get_seq_length"):
        return True
    return (isinstance(value, (tuple, list)) and len(value) > 0 and isinstance(value[0], (tuple, list))
            and len(value[0]) >= 2 and isinstance(value[0][0], torch.Tensor))


def cache_length(cache: Any) -> int:
    """Positions held by a KV cache; CacheNotFollowedError when it cannot be read."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError) as err:
        raise CacheNotFollowedError(f"cannot read the length of the KV cache {type(cache).__name__}") from err


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return ()


def bound_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (positional ones named from ``module.forward``'s signature)."""
    names = _forward_parameters(type(module).forward)
    names = names[1:] if names and names[0] == "self" else names
    bound = dict(kwargs)
    for name, value in zip(names, args):
        bound.setdefault(name, value)
    return bound


def last_logits_only(model: torch.nn.Module, count: int) -> dict:
    """The keyword that makes ``model`` compute the LM head on its last ``count`` positions only (``logits_to_keep``,
    transformers' public argument of its causal LMs), or nothing where its forward does not take it: the logits of
    every position of a batch are [rows, length, vocabulary] floats, most of a full pass's memory."""
    return {"logits_to_keep": count} if "logits_to_keep" in _forward_parameters(type(model).forward) else {}


def find_cache(bound: dict) -> Any:
    """The KV cache among a call's arguments: by one of its known names, else any ``Cache`` value."""
    for name in CACHE_ARGUMENT_NAMES:
        if is_cache(bound.get(name)):
            return bound[name]
    for value in bound.values():
        if hasattr(value, "get_seq_length"):
            return value
    return None


def continuation_length(bound: dict, input_ids: torch.Tensor) -> int:
    """How many positions before ``input_ids`` this call continues (0 for a fresh sequence).

    Read from the 2-D attention mask (it covers the cached positions too) and from
    the cache object; each is checked against the other when both are there.
    """
    mask = bound.get("attention_mask")
    from_mask = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise CacheNotFollowedError(
                f"MEMoE reads a 2-D attention_mask [batch, length]; this call passed "
                f"{type(mask).__name__}{tuple(getattr(mask, 'shape', ()))}. Pass the usual 2-D mask.")
        from_mask = mask.shape[-1] - input_ids.shape[-1]
        if from_mask < 0:
            raise CacheNotFollowedError(f"attention_mask has {mask.shape[-1]} positions for "
                                        f"{input_ids.shape[-1]} input ids")
    cache = find_cache(bound)
    from_cache = cache_length(cache) if cache is not None else None
    if from_mask is not None and from_cache is not None and from_mask != from_cache:
        raise CacheNotFollowedError(
            f"the KV cache holds {from_cache} positions but the attention mask says {from_mask} come before "
            "these ids; MEMoE cannot tell which tokens this call continues. Pass an attention mask that "
            "covers the cached positions and the new ones.")
    if from_mask is not None:
        return from_mask
    return from_cache or 0


def cache_argument_name(model: torch.nn.Module) -> str:
    """The name this transformers release gives the KV cache in ``model.forward``."""
    names = _forward_parameters(type(model).forward)
    for name in CACHE_ARGUMENT_NAMES:
        if name in names:
            return name
    raise CacheNotFollowedError(f"{type(model).__name__}.forward takes no KV cache argument "
                                f"(looked for {CACHE_ARGUMENT_NAMES})")


def output_cache(output: Any) -> Any:
    """The KV cache a forward call returned, whatever the release calls it."""
    for name in CACHE_ARGUMENT_NAMES[:2]:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    raise CacheNotFollowedError("the model returned no KV cache (use_cache=True was passed)")
