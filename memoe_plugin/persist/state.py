"""An adapter's state as tensors and JSON: what :func:`..persist.save.save_adapter` writes and
:func:`..persist.load.load_adapter` puts back (through :meth:`MEMoEAdapter.state` / ``load_state``)."""
from __future__ import annotations

import torch

# the prototype anti-keys: each edit's subject vector, and the prototypes they are made with (kept once per file)
PROTOTYPE_TENSORS = ("subjects", "subject_ids", "subject_skip", "proto_effects", "proto_offsets")


def adapter_state(adapter) -> tuple[dict, dict]:
    """``(tensors, info)`` of everything the edits put into ``adapter``, the tensors on the CPU."""
    tensors, info = live_state(adapter)
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}, info


def kept_bytes(adapter) -> int:
    """Bytes of everything the edits put into ``adapter`` (what :func:`adapter_state` saves), counted in place."""
    return sum(t.numel() * t.element_size() for t in live_state(adapter)[0].values())


# what each kept tensor is, for kept_bytes_by_part (the first prefix that a tensor's name starts with)
PARTS = (("scope.values", "values"), ("scope.value_scale", "values"), ("scope.inputs", "key inputs"),
         ("scope.input_scale", "key inputs"), ("scope.anti", "anti-keys"), ("scope.subject", "subject vectors"),
         ("scope.center", "shared"), ("scope.basis", "shared"), ("scope.proto", "shared"), ("scope.", "keys"),
         ("gate_", "shared"), ("experts", "experts"), ("gate.weight", "experts"), ("expert_of", "keys"),
         ("memory.", "output memory"))


def kept_bytes_by_part(adapter) -> dict:
    """:func:`kept_bytes` by what the bytes are: ``keys`` (with their ids, kinds and norms, and each edit's expert),
    ``values``, ``key inputs`` (the open call's, for the snap), ``anti-keys`` (stop keys, relation-bank anti-keys),
    ``subject vectors``, ``experts`` (and the gate), ``output memory``, ``shared`` (kept once: the centre, directions,
    relation prototypes, gate statistics)."""
    parts: dict = {}
    for name, tensor in live_state(adapter)[0].items():
        part = next(label for prefix, label in PARTS if name.startswith(prefix))
        parts[part] = parts.get(part, 0) + tensor.numel() * tensor.element_size()
    return parts


def live_state(adapter) -> tuple[dict, dict]:
    """:func:`adapter_state`'s tensors as the adapter holds them (not copied), and its info."""
    bypass = adapter.bypass
    tensors = {"experts": bypass.experts, "gate.weight": bypass.gate.weight,
               "gate_shift": bypass.gate_shift, "gate_scale": bypass.gate_scale}
    info = {"num_experts": int(bypass.experts.shape[0]), "gate_calibrated": adapter.gate_calibrated,
            "edits": [dict(edit) for edit in adapter.edits]}
    if adapter.guard is not None:
        info["guard"] = {"keys": sorted(adapter.guard.keys),
                         "owners": {key: sorted(ids) for key, ids in sorted(adapter.guard.owners.items())}}
    if adapter.scope is not None:
        scope_tensors, info["scope"] = scope_state(adapter.scope)
        tensors.update(scope_tensors)
    if bypass.router is not None:
        tensors["expert_of"] = bypass.router.expert_of
    if adapter.memory is not None:
        memory_tensors, info["memory"] = adapter.memory.state()
        tensors.update(memory_tensors)
    return tensors, info


def scope_state(scope) -> tuple[dict, dict]:
    """The key scope's tensors (``scope.*``) and info."""
    tensors = {"scope.center": scope.center, "scope.keys": scope.keys, "scope.edit_ids": scope.edit_ids}
    if bool(scope.key_kind.any()):
        tensors["scope.key_kind"] = scope.key_kind
    if scope.rank:
        tensors["scope.basis"] = scope.basis
    if scope.anti_keys.shape[0]:
        tensors.update({"scope.anti_keys": scope.anti_keys, "scope.anti_edit_ids": scope.anti_edit_ids,
                        "scope.anti_floor": scope.anti_floor})
    if scope.snap > 0:
        tensors.update({"scope.inputs": scope.inputs, "scope.input_row": scope.input_row,
                        "scope.key_norm": scope.key_norm})
    if scope.closed:   # scope_values
        tensors["scope.values"] = scope.values
    if scope.subjects.shape[0]:   # scope_anti_keys: prototypes
        tensors.update({f"scope.{name}": getattr(scope, name) for name in PROTOTYPE_TENSORS})
    if scope.storage == "int8":
        tensors.update({f"scope.{scope.SCALES[name]}": getattr(scope, scope.SCALES[name])
                        for name in scope.SCALES if f"scope.{name}" in tensors})
    return tensors, {"calibrated": scope.calibrated, "storage": scope.storage}


@torch.no_grad()
def load_adapter_state(adapter, tensors: dict, info: dict) -> None:
    """Put a saved :func:`adapter_state` into ``adapter`` (freshly attached)."""
    bypass = adapter.bypass
    device = bypass.experts.device
    bypass.resize_experts(int(info.get("num_experts", tensors["experts"].shape[0])))
    bypass.experts.copy_(tensors["experts"].to(device))
    bypass.gate.weight.copy_(tensors["gate.weight"].to(device))
    for name in ("gate_shift", "gate_scale"):
        if name in tensors:
            getattr(bypass, name).copy_(tensors[name].to(device))
    adapter.gate_calibrated = bool(info.get("gate_calibrated", "gate_shift" in tensors))
    for parameter in bypass.trainable_parameters:   # as train_experts leaves them
        parameter.requires_grad_(False)
    adapter.edits = [dict(edit) for edit in info.get("edits", [])]
    if adapter.guard is not None:
        guard = info.get("guard") or {}
        adapter.guard.restore((set(guard.get("keys", [])),
                               {key: set(ids) for key, ids in (guard.get("owners") or {}).items()}))
    if adapter.scope is not None and "scope.keys" in tensors:
        load_scope_state(adapter.scope, tensors, info.get("scope") or {}, device)
    if bypass.router is not None and "expert_of" in tensors:
        bypass.router.expert_of = tensors["expert_of"].to(device)
    if adapter.memory is not None and "memory" in info:
        adapter.memory.load_state({k: v.to(device) for k, v in tensors.items() if k.startswith("memory.")},
                                  info["memory"])


def load_scope_state(scope, tensors: dict, info: dict, device) -> None:
    """Put saved ``scope.*`` tensors back; refuse settings the file cannot honour."""
    stored = info.get("storage", "float16")
    if stored != scope.storage:
        raise ValueError(f"this adapter's key scope was saved with scope_storage: {stored}, and its hparams "
                         f"ask for {scope.storage}; load it with the scope_storage it was edited with")
    for name, scale in scope.SCALES.items():
        if scope.storage == "int8" and f"scope.{name}" in tensors:
            setattr(scope, scale, tensors[f"scope.{scale}"].to(device))
    scope.center.copy_(tensors["scope.center"].to(device))
    scope.keys = tensors["scope.keys"].to(device)
    scope.edit_ids = tensors["scope.edit_ids"].to(device)
    kinds = tensors.get("scope.key_kind")   # files without it have plain keys only
    scope.key_kind = (torch.zeros(len(scope.edit_ids), dtype=torch.int8) if kinds is None
                      else kinds.to(torch.int8)).to(device)
    if scope.rank:
        if "scope.basis" not in tensors:
            raise ValueError("this adapter was saved without the key scope's directions (scope_rank: 0), and "
                             "its hparams ask for scope_rank > 0; load it with the scope_rank it was edited "
                             "with")
        scope.basis.copy_(tensors["scope.basis"].to(device))
    if "scope.anti_keys" in tensors:
        scope.anti_keys = tensors["scope.anti_keys"].to(device)
        scope.anti_edit_ids = tensors["scope.anti_edit_ids"].to(device)
        scope.anti_floor = tensors["scope.anti_floor"].to(device)
    if "scope.values" in tensors:
        if scope.values.shape[1] != tensors["scope.values"].shape[1]:
            raise ValueError("this adapter keeps its keys' outputs (scope_values: true), and its hparams ask for "
                             "scope_values: false; load it with the scope_values it was edited with")
        scope.values = tensors["scope.values"].to(device)
    if "scope.subjects" in tensors:
        for name in PROTOTYPE_TENSORS:
            setattr(scope, name, tensors[f"scope.{name}"].to(device))
        scope.forget_made()
    if scope.snap > 0:
        if "scope.inputs" not in tensors:
            raise ValueError("this adapter was saved without the keys' layer inputs (scope_snap: 0), "
                             "and its hparams ask for scope_snap > 0; load it with the scope_snap it "
                             "was edited with")
        scope.inputs = tensors["scope.inputs"].to(device)
        if "scope.input_row" in tensors:
            scope.input_row = tensors["scope.input_row"].to(device)
            scope.key_norm = tensors["scope.key_norm"].to(device)
        else:   # format v3 files before the views were shared: one kept input per key
            scope.input_row = torch.arange(scope.inputs.shape[0], device=device)
            scope.key_norm = torch.zeros(scope.inputs.shape[0], device=device)
    scope.calibrated = bool(info.get("calibrated", True))
