"""The edits an adapter holds, and taking chosen ones out alone.

Done on an adapter's state (its tensors and JSON info, :func:`.state.adapter_state`), so that one function serves
an adapter in a model (:func:`remove_edits`) and a saved file (:func:`remove_edits_from_file`, ``memoe-adapter``).

Only an adapter whose edits keep their outputs apart can lose one alone: with ``scope_values`` every key of an edit
holds its own output row, so taking out an edit's keys, values, anti-keys, subject vector and guard anchors leaves
every other row exactly as it was. Experts shared by several edits (``scope_values: false``) cannot be split, and
are refused. Edit ids stay dense: the edits after a removed one move down.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

# the id tensor that owns each group of row tensors: row i of every tensor in a group belongs to edit ids[i]
ROWS_OWNED_BY = {
    "scope.edit_ids": ("scope.keys", "scope.key_scale", "scope.key_kind", "scope.input_row", "scope.key_norm",
                       "scope.values", "scope.value_scale"),
    "scope.anti_edit_ids": ("scope.anti_keys", "scope.anti_scale", "scope.anti_floor"),
    "scope.subject_ids": ("scope.subjects", "scope.subject_scale", "scope.subject_skip"),
}


class EditRemovalError(ValueError):
    """The edits asked for cannot be taken out of this adapter (the message says why and what to do)."""


def edit_table(edits: list[dict]) -> list[dict]:
    """``edits`` in order, each with its id: ``{"id": i, "prompt", "target_new"[, "subject"]}``."""
    return [{"id": i, **edit} for i, edit in enumerate(edits)]


def list_edits(source) -> list[dict]:
    """The edits held by the adapter of a model, or by an adapter file (a path), with the ids that
    :func:`remove_edits` takes."""
    if isinstance(source, nn.Module):
        from ..adapter import get_adapter
        adapter = get_adapter(source)
        return [] if adapter is None else edit_table(adapter.edits)
    from .file import read_adapter_metadata
    return edit_table(read_adapter_metadata(source)["edits"])


def check_removable(tensors: dict, info: dict, ids: Iterable[int]) -> list[int]:
    """``ids`` sorted and deduplicated, after checking that each names an edit and that the adapter keeps its
    edits apart; else :class:`EditRemovalError`."""
    count = len(info.get("edits", []))
    ids = sorted(set(int(i) for i in ids))
    if not ids:
        raise EditRemovalError("no edit ids given; list the adapter's edits (list_edits, memoe-adapter list) and "
                               "name the ones to remove")
    wrong = [i for i in ids if not 0 <= i < count]
    if wrong:
        raise EditRemovalError(f"edit id(s) {wrong} do not exist: this adapter holds edits 0..{count - 1}")
    if "scope.values" not in tensors or tensors["scope.values"].shape[0] != tensors["scope.keys"].shape[0]:
        raise EditRemovalError("this adapter's edits share its experts (scope_values: false), so one cannot be "
                               "taken out without the others; edit with scope_values: true (the shipped files) "
                               "to remove edits one by one, or restore() and edit again without them")
    if any(name.startswith("memory.") for name in tensors):
        raise EditRemovalError("this adapter has an output memory (memory_rows > 0), whose rows mix the edits; "
                               "it cannot lose one edit alone")
    return ids


def drop_edits(tensors: dict, info: dict, ids: Iterable[int]) -> tuple[dict, dict]:
    """A new ``(tensors, info)`` without the edits ``ids``: their keys, values, anti-keys, subject vectors, expert
    assignment and the guard anchors no other edit owns; the other edits renumbered in order."""
    removed = check_removable(tensors, info, ids)
    count = len(info["edits"])
    new_id = torch.full((count,), -1, dtype=torch.long)
    kept = torch.tensor([i for i in range(count) if i not in set(removed)], dtype=torch.long)
    new_id[kept] = torch.arange(len(kept))
    out = dict(tensors)
    for owner, rows in ROWS_OWNED_BY.items():
        if owner not in tensors:
            continue
        keep = new_id[tensors[owner].long()] >= 0
        for name in rows:
            if name in tensors and tensors[name].shape[0] == keep.shape[0] and tensors[name].dim() >= 1:
                out[name] = tensors[name][keep].clone()
        out[owner] = new_id[tensors[owner].long()[keep]].to(tensors[owner].dtype)
    if "expert_of" in tensors:
        out["expert_of"] = tensors["expert_of"][kept].clone()
    info = dict(info, edits=[dict(info["edits"][i]) for i in kept.tolist()])
    if info.get("guard"):
        owners = {}
        for key, owned in info["guard"].get("owners", {}).items():
            left = sorted(int(new_id[i]) for i in owned if new_id[i] >= 0)
            if left:
                owners[key] = left
        orphaned = {key for key, owned in info["guard"].get("owners", {}).items() if key not in owners and owned}
        info["guard"] = {"keys": sorted(set(info["guard"].get("keys", [])) - orphaned), "owners": owners}
    return out, info


def remove_edits(model: nn.Module, ids: Iterable[int]) -> list[dict]:
    """Take the edits ``ids`` (as :func:`list_edits` numbers them) out of ``model``'s adapter; return them.

    Their prompts get the base model's answers again, and every other edit keeps its keys and outputs bit for bit.
    The edits after a removed one are renumbered. Needs an adapter edited with ``scope_values: true``; anything
    else raises :class:`EditRemovalError` before the model is touched."""
    from ..adapter import MEMoEAdapter, get_adapter

    adapter = get_adapter(model)
    if adapter is None:
        raise EditRemovalError("this model has no MEMoE adapter; there are no edits to remove")
    tensors, info = adapter.state()
    removed = [dict(info["edits"][i]) for i in check_removable(tensors, info, ids)]
    tensors, info = drop_edits(tensors, info, ids)
    adapter.detach()
    try:
        fresh = MEMoEAdapter.attach(model, adapter.tokenizer, adapter.hparams)
        try:
            fresh.load_state({name: t.to(adapter.bypass.gate.weight.device) for name, t in tensors.items()}, info)
        except BaseException:
            fresh.detach()
            raise
    except BaseException:
        adapter.reattach()
        raise
    return removed


def remove_edits_from_file(path, ids: Iterable[int], out: Optional[Path] = None) -> tuple[Path, list[dict]]:
    """Write the adapter file ``path`` without the edits ``ids`` to ``out`` (default: ``path`` itself, replaced
    atomically); return the path written and the edits removed. Needs no model."""
    import json

    from .file import FORMAT_NAME, FORMAT_VERSION, atomic_save, read_adapter_file
    from .identity import tensor_sha256

    path = Path(path).expanduser()
    document, tensors = read_adapter_file(path, tensors=True)
    info = dict(document.get("state") or {}, edits=document["edits"])
    removed = [dict(info["edits"][i]) for i in check_removable(tensors, info, ids)]
    tensors, info = drop_edits(tensors, info, ids)
    document = dict(document, edits=info["edits"], state=info, format_version=FORMAT_VERSION)
    document["tensors"] = {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                  "sha256": tensor_sha256(t)} for name, t in tensors.items()}
    if info.get("guard") is not None:
        document["anchors"] = dict(document["anchors"], locality_guard_keys=info["guard"]["keys"])
    target = Path(out).expanduser() if out is not None else path
    atomic_save({name: t.contiguous() for name, t in tensors.items()},
                {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                 "memoe": json.dumps(document, ensure_ascii=False, default=str)}, target)
    return target, removed
