"""load_adapter: check that a saved adapter fits the model, then put it in."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..adapter import MEMoEAdapter, get_adapter
from ..locate import resolve_module
from ..hparams import MEMoEHyperParams
from ..layer import projection_shape
from .file import PathLike, read_adapter_file
from .identity import model_identity, resolved_extractor, tensor_sha256, tokenizer_fingerprint


def _resolve_device(module: nn.Module, hparams: MEMoEHyperParams, device) -> Union[int, str]:
    actual = module.weight.device
    if device is None:
        return str(actual)
    try:
        wanted = torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(str(device))
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu', 'cuda:0' or a CUDA index") from None
    if not hparams.model_parallel and (wanted.type != actual.type
                                       or (wanted.index is not None and wanted.index != actual.index)):
        raise ValueError(f"device {device!r} was asked for, but the wrapped module {hparams.module_name} is on "
                         f"{actual}; the adapter must sit on its layer's device. Move the model "
                         f"(model.to({str(wanted)!r})) or pass device=None")
    return device


def load_adapter(model: nn.Module, tokenizer, path: PathLike, device=None) -> MEMoEAdapter:
    """Attach the adapter saved at ``path`` to ``model`` and return it.

    ``model`` must be the model the adapter was saved from (same config fingerprint,
    same wrapped weights when loaded in the same dtype) and ``tokenizer`` its tokenizer.
    Every mismatch raises ``ValueError`` naming what differs, before the model is
    touched. The adapter's tensors go on the wrapped layer's device; ``device`` (None:
    that device) is recorded as ``hparams.device`` and, without ``model_parallel``, must
    be that device. The saved hparams are reused, with ``model_name`` set to the
    model's ``name_or_path`` when it has one.

    Afterwards ``apply_memoe_to_model`` keeps training the same experts (pass hparams
    with the same structural settings), and its ``restore`` / ``remove_memoe(model)``
    return the model bit for bit to its state before the load.
    """
    path = Path(path).expanduser()
    document, tensors = read_adapter_file(path, tensors=True)
    hparams = check_compatible(model, tokenizer, document, tensors, path, device)
    return restore(model, tokenizer, hparams, document, tensors, path)


def check_compatible(model: nn.Module, tokenizer, document: dict, tensors: dict, path: Path,
                     device=None) -> MEMoEHyperParams:
    """The saved hparams, ready for this model, after checking that the adapter fits it.

    Raises ``ValueError`` naming what differs (model config, module, shapes, weights,
    tokenizer, device) without touching the model.
    """
    if get_adapter(model) is not None:
        raise ValueError("this model already has a MEMoE adapter; call restore() / remove_memoe(model) before "
                         "load_adapter, or keep editing the adapter it has")

    # ---- the model
    saved_model, here = document["model"], model_identity(model)
    if saved_model.get("config_sha256") != here["config_sha256"]:
        saved_config, config = saved_model.get("config") or {}, here["config"]
        differing = sorted(k for k in set(saved_config) | set(config) if saved_config.get(k) != config.get(k))
        shown = ", ".join(f"{k}: saved {saved_config.get(k, '<absent>')!r}, here {config.get(k, '<absent>')!r}"
                          for k in differing[:6]) + (" ..." if len(differing) > 6 else "")
        raise ValueError(f"{path} was saved from another model ({saved_model.get('model_type')} "
                         f"{saved_model.get('name_or_path')!r}); this model ({here['model_type']} "
                         f"{here['name_or_path']!r}) has a different config: {shown or 'fingerprints differ'}. "
                         "Load the adapter into the model it was saved from.")

    # ---- hparams, module, shapes
    saved_module = document["module"]
    try:
        hparams = MEMoEHyperParams.from_dict(document["hparams"])
    except ValueError as err:
        raise ValueError(f"{path}: the saved hparams are not valid here ({err}); the file is corrupt or "
                         "from an incompatible memoe_plugin") from None
    if hparams.module_name != saved_module.get("name") or hparams.layer != saved_module.get("layer"):
        raise ValueError(f"{path}: the saved hparams target {hparams.module_name} but the saved module record "
                         f"says {saved_module.get('name')}; the file is corrupt. Save the adapter again.")
    try:
        _, _, module = resolve_module(model, hparams)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} wraps {hparams.module_name} (layer {hparams.layer}), which this model cannot "
                         f"take: {err}") from None
    if type(module).__name__ != saved_module.get("class"):
        raise ValueError(f"{path} wraps a {saved_module.get('class')} at {hparams.module_name}; here it is a "
                         f"{type(module).__name__}. Load the adapter into the model it was saved from.")
    in_features, out_features = projection_shape(module)
    embedding = model.get_input_embeddings()
    feature_dim = 0 if hparams.routing_input == "token" else embedding.weight.shape[1]
    experts = hparams.num_experts   # a mixture that grows with its edits has at least that many
    if hparams.expert_routing == "key" and hparams.edits_per_expert > 0 and tensors["experts"].dim() == 3:
        experts = max(experts, int(tensors["experts"].shape[0]))
    if hparams.scope_values and tensors["experts"].dim() == 3 and tensors["experts"].shape[0] == 0:
        experts = 0   # every key closed with its value: the experts were emptied after the last call
    expected = {"experts": [experts, in_features, out_features],
                "gate.weight": [experts, in_features + feature_dim],
                "gate_shift": [in_features + feature_dim], "gate_scale": [in_features + feature_dim]}
    for name, shape in expected.items():
        if name not in tensors:   # a version-1 file
            continue
        if list(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, but "
                             f"{hparams.module_name} of this model needs {shape} (num_experts "
                             f"{experts}, projection {in_features}->{out_features}, routing dim "
                             f"{feature_dim}). Load the adapter into the model it was saved from.")
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"{path}: tensor {name!r} is {tensors[name].dtype}; MEMoE adapters are float32. "
                             "The file was not written by save_adapter.")
    width = model.get_input_embeddings().weight.shape[1] if hparams.scope_layer >= 0 else in_features
    view = min(hparams.scope_rank, width) if hparams.scope_rank else width
    for name, width in (("scope.keys", view), ("scope.anti_keys", view), ("scope.inputs", in_features),
                        ("scope.values", out_features), ("scope.subjects", view)):
        if hparams.scope_keys and name in tensors and tensors[name].shape[-1] != width:
            raise ValueError(f"{path}: the key scope's {name} have {tensors[name].shape[-1]} features but "
                             f"{hparams.module_name} with these scope settings needs {width}; the file is corrupt.")
    anti = [tensors[n].shape[0] for n in ("scope.anti_keys", "scope.anti_edit_ids", "scope.anti_floor") if n in tensors]
    if anti and (len(anti) != 3 or len(set(anti)) != 1):
        raise ValueError(f"{path}: the key scope's anti-keys, their edit ids and floors do not match; the file is "
                         "corrupt.")
    for name, scale in (("scope.keys", "scope.key_scale"), ("scope.anti_keys", "scope.anti_scale"),
                        ("scope.inputs", "scope.input_scale"), ("scope.values", "scope.value_scale")):
        if name in tensors and tensors[name].dtype == torch.int8 and (
                scale not in tensors or tensors[scale].shape != tensors[name].shape[:1]):
            raise ValueError(f"{path}: the key scope's {name} are int8 but {scale} (one scale per row) is missing "
                             "or of another length; the file is corrupt.")
    keys = tensors["scope.keys"].shape[0] if "scope.keys" in tensors else 0
    if "scope.input_row" in tensors:   # each key's kept input, or -1 where its view is the input itself
        rows = tensors["scope.input_row"]
        inputs = tensors["scope.inputs"].shape[0] if "scope.inputs" in tensors else 0
        if rows.shape[0] != keys or tensors.get("scope.key_norm", rows).shape[0] != keys or (
                rows.numel() and int(rows.max()) >= inputs):
            raise ValueError(f"{path}: the key scope has {keys} keys, {rows.shape[0]} input rows and {inputs} kept "
                             "inputs, which do not match; the file is corrupt.")
    elif "scope.inputs" in tensors and tensors["scope.inputs"].shape[0] != keys:
        raise ValueError(f"{path}: the key scope has {keys} keys but "
                         f"{tensors['scope.inputs'].shape[0]} key inputs; the file is corrupt.")
    if "scope.values" in tensors and tensors["scope.values"].shape[0] > keys:
        raise ValueError(f"{path}: the key scope has {keys} keys and {tensors['scope.values'].shape[0]} values; "
                         "the file is corrupt.")
    weight_dtype = str(module.weight.dtype).replace("torch.", "")
    if weight_dtype == saved_module.get("weight_dtype") and module.weight.device.type != "meta" \
            and tensor_sha256(module.weight) != saved_module.get("weight_sha256"):
        raise ValueError(f"{path} was trained on other weights: {hparams.module_name} of this model differs "
                         f"from the one the adapter was saved with (same config, different checkpoint). Load "
                         f"the adapter into the model it was saved from ({saved_model.get('name_or_path')!r}).")

    # ---- tokenizer
    saved_tok, tok_here = document["tokenizer"], tokenizer_fingerprint(tokenizer)
    if saved_tok.get("size") != tok_here["size"] or (saved_tok.get("vocab_sha256") and tok_here["vocab_sha256"]
                                                     and saved_tok["vocab_sha256"] != tok_here["vocab_sha256"]):
        raise ValueError(f"{path} was saved with another tokenizer (size {saved_tok.get('size')}, here "
                         f"{tok_here['size']}, or a different vocabulary); targets and anchors depend on it. "
                         "Pass the tokenizer of the model the adapter was saved from.")

    hparams.device = _resolve_device(module, hparams, device)
    if here["name_or_path"]:
        hparams.model_name = here["name_or_path"]
    return hparams


def restore(model: nn.Module, tokenizer, hparams: MEMoEHyperParams, document: dict, tensors: dict,
            path: Path) -> MEMoEAdapter:
    """Attach an adapter built from ``hparams`` and copy the saved state into it (detached again on error)."""
    adapter = MEMoEAdapter.attach(model, tokenizer, hparams)
    try:
        wanted_extractor = document["anchors"].get("extractor")
        if resolved_extractor(adapter) != wanted_extractor:
            raise ValueError(f"{path} was trained with the {wanted_extractor!r} entity extractor (anchor_backend "
                             f"{hparams.anchor_backend!r}), but here it resolves to {resolved_extractor(adapter)!r}, "
                             "so edits would route differently. Install the NLTK data "
                             "(python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng "
                             "maxent_ne_chunker_tab words) or load where the same extractor is available.")
        state = document.get("state")
        if state is None:   # format 1 and 2: weights, edits and the guard's keys only
            guard_keys = document["anchors"].get("locality_guard_keys")
            if adapter.guard is not None and not isinstance(guard_keys, list):
                raise ValueError(f"{path}: locality_guard is on but the file has no locality-guard keys; the file "
                                 "is corrupt. Save the adapter again.")
            state = {"num_experts": int(tensors["experts"].shape[0]), "gate_calibrated": "gate_shift" in tensors,
                     "edits": document["edits"], "guard": {"keys": guard_keys or [], "owners": {}}}
        elif adapter.guard is not None and "guard" not in state:
            raise ValueError(f"{path}: locality_guard is on but the file has no locality-guard keys; the file "
                             "is corrupt. Save the adapter again.")
        adapter.load_state(tensors, state)
    except BaseException:
        adapter.detach()
        raise
    return adapter
