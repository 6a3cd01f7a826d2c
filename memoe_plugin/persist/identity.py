"""What identifies the model, the weights, the tokenizer and the anchor settings an adapter belongs to."""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

# config.to_dict() keys that do not describe the network (see the package docstring)
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                                  "output_attentions", "output_hidden_states", "return_dict"})


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


def tensor_sha256(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    try:
        vocab = sorted(tokenizer.get_vocab().items())
    except Exception:   # a tokenizer without get_vocab: identify it by its length only
        vocab = None
    return {"size": len(tokenizer),
            "vocab_sha256": None if vocab is None else _sha256_text(json.dumps(vocab, ensure_ascii=False))}


def model_identity(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {"name_or_path": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
            "model_type": getattr(config, "model_type", None),
            "class": type(model).__name__,
            "config_sha256": config_fingerprint(model),
            "config": _config_dict(model)}


def resolved_extractor(adapter) -> Optional[str]:
    """The entity extractor in use ('offline', 'nltk'), or None when nothing needs entities."""
    extractor = getattr(adapter, "extractor", None) or adapter.encoder.extractor
    if extractor is None:
        return None
    return getattr(extractor, "name", None) or type(extractor).__name__


def guard_keys(adapter) -> Optional[list]:
    guard = getattr(adapter, "guard", None)
    return None if guard is None else sorted(guard.keys)
