"""Save a trained MEMoE adapter to disk and load it into a fresh copy of the same model.

File format (``FORMAT_VERSION`` 2): **one ``.safetensors`` file**. Its tensors are

* ``experts``      ``[num_experts, in_features, out_features]`` float32
* ``gate.weight``  ``[num_experts, in_features + routing_dim]`` float32
* ``gate_shift``, ``gate_scale``  ``[in_features + routing_dim]`` float32: the gate
  sees ``(R(x) - gate_shift) * gate_scale`` (``gate_norm``, ``gate_token_weight``).
  Version 1 files have no such tensors; they load with the identity.

and its safetensors header metadata (a str -> str map) holds

* ``format``         ``"memoe_plugin.adapter"``
* ``format_version`` the integer as a string
* ``memoe``          one JSON document with everything else: the model's identity
  (``name_or_path``, ``model_type``, the filtered config and its sha256
  fingerprint), the tokenizer's fingerprint, the wrapped module (layer, dotted name,
  class, weight dtype and sha256), the tensors' shapes, dtypes and sha256, the full
  hparams dict, the anchor settings (including the extractor that ``auto``
  resolved to, and the locality guard's keys when ``locality_guard`` is on),
  ``memoe_plugin.__version__`` and the list of edits (as ``adapter.edits`` holds them).

No pickle is involved anywhere: tensors go through safetensors, the rest is JSON.
Everything is in one file so that a save is one atomic ``os.replace`` of a temp
file written and fsync'ed in the same directory; a reader never sees half a file.

Config fingerprint
    sha256 of ``json.dumps(config.to_dict(), sort_keys=True)`` after dropping the keys
    that do not describe the network: every key starting with ``_`` (``_name_or_path``,
    ``_commit_hash``, ``_attn_implementation*``), ``transformers_version``,
    ``architectures`` (``save_pretrained`` fills it in), ``dtype``/``torch_dtype``
    (the adapter is float32 whatever the model's dtype), and the runtime switches
    ``use_cache``, ``output_attentions``, ``output_hidden_states``, ``return_dict``.
    The filtered config itself is stored too, so a refusal names the keys that differ.
    Nested configs (``text_config`` ...) are filtered the same way.

Weights
    The config says nothing about the weights, so the sha256 of the wrapped
    projection's weight is stored as well and compared when the model is loaded in
    the same dtype (another fine-tune of the same architecture is refused). In another
    dtype (e.g. saved from float32, loaded in bfloat16) the bytes cannot match and
    that check is skipped; the logits then differ by the dtype's rounding only.

Tokenizer fingerprint
    ``len(tokenizer)`` and the sha256 of its sorted vocabulary: target tokens and
    anchors are both computed with it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .hparams import MEMoEHyperParams
from .model import MEMoEAdapter, get_adapter, resolve_module
from .layer import projection_shape

FORMAT_NAME = "memoe_plugin.adapter"
FORMAT_VERSION = 2
TENSOR_NAMES = ("experts", "gate.weight", "gate_shift", "gate_scale")
TENSOR_NAMES_V1 = ("experts", "gate.weight")
# config.to_dict() keys that do not describe the network (see the module docstring)
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                                  "output_attentions", "output_hidden_states", "return_dict"})

PathLike = Union[str, os.PathLike]

__all__ = ["save_adapter", "load_adapter", "read_adapter_metadata", "config_fingerprint", "FORMAT_VERSION"]


# ---------------------------------------------------------------- fingerprints
def _filter_config(value):
    if isinstance(value, dict):
        return {k: _filter_config(v) for k, v in value.items()
                if not (isinstance(k, str) and (k.startswith("_") or k in VOLATILE_CONFIG_KEYS))}
    if isinstance(value, (list, tuple)):
        return [_filter_config(v) for v in value]
    return value


def _config_dict(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    # round trip through JSON so that what is compared is exactly what is stored
    return json.loads(json.dumps(_filter_config(raw), sort_keys=True, default=str))


def config_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config with the volatile keys removed (see the module docstring)."""
    return _sha256_text(json.dumps(_config_dict(model), sort_keys=True))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _tokenizer_fingerprint(tokenizer) -> dict:
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except Exception:   # a tokenizer without get_vocab: identify it by its length only
        vocab = None
    return {"size": len(tokenizer),
            "vocab_sha256": None if vocab is None else _sha256_text(json.dumps(vocab, ensure_ascii=False))}


def _model_identity(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {"name_or_path": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
            "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__,
            "config_sha256": config_fingerprint(model),
            "config": _config_dict(model)}


def _resolved_extractor(adapter: MEMoEAdapter) -> Optional[str]:
    """The entity extractor in use ('offline', 'nltk'), or None when nothing needs entities."""
    extractor = getattr(adapter, "extractor", None) or adapter.encoder.extractor
    if extractor is None:
        return None
    return getattr(extractor, "name", None) or type(extractor).__name__


def _guard_keys(adapter: MEMoEAdapter) -> Optional[list]:
    guard = getattr(adapter, "guard", None)
    return None if guard is None else sorted(guard.keys)


# ------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write the adapter attached to ``model`` to the single file ``path`` (atomically).

    ``path`` is the file itself; ``.safetensors`` is the suggested suffix. Parent
    directories are created. An existing file is replaced only once the new one is
    complete. Returns the path written.
    """
    from . import __version__

    adapter = get_adapter(model)
    if adapter is None:
        raise ValueError("this model has no MEMoE adapter to save; edit it with apply_memoe_to_model "
                         "(or load_adapter) first")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a directory; save_adapter writes one file, e.g. {path / 'adapter.safetensors'}")
    bypass, hp = adapter.bypass, adapter.hparams
    tensors = {"experts": bypass.experts, "gate.weight": bypass.gate.weight,
               "gate_shift": bypass.gate_shift, "gate_scale": bypass.gate_scale}
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    base_weight = adapter.base_module.weight
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "memoe_plugin_version": __version__,
        "model": _model_identity(model),
        "tokenizer": _tokenizer_fingerprint(adapter.tokenizer),
        "module": {"layer": hp.layer, "module_template": hp.module_template, "name": hp.module_name,
                   "class": type(adapter.base_module).__name__,
                   "shape": list(projection_shape(adapter.base_module)),
                   "weight_dtype": str(base_weight.dtype).replace("torch.", ""),
                   "weight_sha256": _tensor_sha256(base_weight)},
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                           "sha256": _tensor_sha256(t)} for name, t in tensors.items()},
        "hparams": hp.to_dict(),
        "anchors": {"routing_input": hp.routing_input, "anchor_backend": hp.anchor_backend,
                    "extractor": _resolved_extractor(adapter), "feature_dim": adapter.encoder.dim,
                    "anchor_cache_size": hp.anchor_cache_size,
                    "locality_guard_keys": _guard_keys(adapter)},
        "edits": [dict(edit) for edit in adapter.edits],
    }
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "memoe": json.dumps(document, ensure_ascii=False, default=str)}
    _atomic_save(tensors, metadata, path)
    return path


def _atomic_save(tensors: dict, metadata: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:   # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------ load
def read_adapter_metadata(path: PathLike) -> dict:
    """The JSON document stored in an adapter file, after checking format and version."""
    return _read(Path(path).expanduser(), tensors=False)[0]


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.exists():
        raise ValueError(f"no MEMoE adapter file at {path}; save one with save_adapter(model, path)")
    if path.is_dir():
        hint = next(iter(sorted(path.glob("*.safetensors"))), None)
        raise ValueError(f"{path} is a directory; pass the adapter file itself"
                         + (f", e.g. {hint}" if hint else ""))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            loaded = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
    except Exception as err:   # safetensors raises its own error types for malformed files
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                         "it is corrupt or truncated. Save the adapter again.") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is a safetensors file but not a MEMoE adapter (format "
                         f"{metadata.get('format')!r}, expected {FORMAT_NAME!r}); save it with save_adapter")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')!r} is not an integer; "
                         "the file is corrupt. Save the adapter again.") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has adapter format version {version}, newer than the {FORMAT_VERSION} this "
                         "memoe_plugin reads; upgrade memoe_plugin to load it")
    if version < 1:
        raise ValueError(f"{path}: adapter format version {version} is not valid; the file is corrupt")
    try:
        document = json.loads(metadata["memoe"])
        for key in ("model", "tokenizer", "module", "tensors", "hparams", "anchors", "edits"):
            document[key]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the adapter's JSON metadata is missing or damaged ({type(err).__name__}: "
                         f"{err}); the file is corrupt. Save the adapter again.") from None
    if tensors:
        required = TENSOR_NAMES if version >= 2 else TENSOR_NAMES_V1
        missing = [name for name in required if name not in loaded]
        if missing:
            raise ValueError(f"{path}: tensor(s) {missing} are missing; the file is corrupt. Save the adapter again.")
        for name in required:
            saved = document["tensors"].get(name, {})
            tensor = loaded[name]
            if list(tensor.shape) != saved.get("shape") or _tensor_sha256(tensor) != saved.get("sha256"):
                raise ValueError(f"{path}: tensor {name!r} does not match its recorded shape/checksum; the file "
                                 "is corrupt. Save the adapter again.")
    return document, loaded


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
    document, tensors = _read(path, tensors=True)
    if get_adapter(model) is not None:
        raise ValueError("this model already has a MEMoE adapter; call restore() / remove_memoe(model) before "
                         "load_adapter, or keep editing the adapter it has")

    # ---- the model
    saved_model, here = document["model"], _model_identity(model)
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
    expected = {"experts": [hparams.num_experts, in_features, out_features],
                "gate.weight": [hparams.num_experts, in_features + feature_dim],
                "gate_shift": [in_features + feature_dim], "gate_scale": [in_features + feature_dim]}
    for name, shape in expected.items():
        if name not in tensors:   # a version-1 file
            continue
        if list(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, but "
                             f"{hparams.module_name} of this model needs {shape} (num_experts "
                             f"{hparams.num_experts}, projection {in_features}->{out_features}, routing dim "
                             f"{feature_dim}). Load the adapter into the model it was saved from.")
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"{path}: tensor {name!r} is {tensors[name].dtype}; MEMoE adapters are float32. "
                             "The file was not written by save_adapter.")
    weight_dtype = str(module.weight.dtype).replace("torch.", "")
    if weight_dtype == saved_module.get("weight_dtype") and module.weight.device.type != "meta" \
            and _tensor_sha256(module.weight) != saved_module.get("weight_sha256"):
        raise ValueError(f"{path} was trained on other weights: {hparams.module_name} of this model differs "
                         f"from the one the adapter was saved with (same config, different checkpoint). Load "
                         f"the adapter into the model it was saved from ({saved_model.get('name_or_path')!r}).")

    # ---- tokenizer
    saved_tok, tok_here = document["tokenizer"], _tokenizer_fingerprint(tokenizer)
    if saved_tok.get("size") != tok_here["size"] or (saved_tok.get("vocab_sha256") and tok_here["vocab_sha256"]
                                                     and saved_tok["vocab_sha256"] != tok_here["vocab_sha256"]):
        raise ValueError(f"{path} was saved with another tokenizer (size {saved_tok.get('size')}, here "
                         f"{tok_here['size']}, or a different vocabulary); targets and anchors depend on it. "
                         "Pass the tokenizer of the model the adapter was saved from.")

    hparams.device = _resolve_device(module, hparams, device)
    if here["name_or_path"]:
        hparams.model_name = here["name_or_path"]

    # ---- attach, then copy
    adapter = MEMoEAdapter.attach(model, tokenizer, hparams)
    try:
        wanted_extractor = document["anchors"].get("extractor")
        if _resolved_extractor(adapter) != wanted_extractor:
            raise ValueError(f"{path} was trained with the {wanted_extractor!r} entity extractor (anchor_backend "
                             f"{hparams.anchor_backend!r}), but here it resolves to {_resolved_extractor(adapter)!r}, "
                             "so edits would route differently. Install the NLTK data "
                             "(python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng "
                             "maxent_ne_chunker_tab words) or load where the same extractor is available.")
        bypass = adapter.bypass
        with torch.no_grad():
            bypass.experts.copy_(tensors["experts"].to(bypass.experts.device))
            bypass.gate.weight.copy_(tensors["gate.weight"].to(bypass.gate.weight.device))
            for name in ("gate_shift", "gate_scale"):
                if name in tensors:
                    getattr(bypass, name).copy_(tensors[name].to(bypass.gate.weight.device))
        adapter.gate_calibrated = "gate_shift" in tensors
        for parameter in bypass.trainable_parameters:   # as train_experts leaves them
            parameter.requires_grad_(False)
        adapter.edits = [dict(edit) for edit in document["edits"]]
        guard_keys = document["anchors"].get("locality_guard_keys")
        if getattr(adapter, "guard", None) is not None:
            if not isinstance(guard_keys, list):
                raise ValueError(f"{path}: locality_guard is on but the file has no locality-guard keys; the file "
                                 "is corrupt. Save the adapter again.")
            adapter.guard.add(guard_keys)
    except BaseException:
        adapter.detach()
        raise
    return adapter
