"""save_adapter: everything an adapter needs to be loaded again, in one file."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..adapter import get_adapter
from ..layer import projection_shape
from .file import FORMAT_NAME, FORMAT_VERSION, PathLike, atomic_save
from .identity import guard_keys, model_identity, resolved_extractor, tensor_sha256, tokenizer_fingerprint


def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write the adapter attached to ``model`` to the single file ``path`` (atomically).

    ``path`` is the file itself; ``.safetensors`` is the suggested suffix. Parent
    directories are created. An existing file is replaced only once the new one is
    complete. Returns the path written.
    """
    from .. import __version__

    adapter = get_adapter(model)
    if adapter is None:
        raise ValueError("this model has no MEMoE adapter to save; edit it with apply_memoe_to_model "
                         "(or load_adapter) first")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a directory; save_adapter writes one file, e.g. {path / 'adapter.safetensors'}")
    hp = adapter.hparams
    tensors, state = adapter.state()
    base_weight = adapter.base_module.weight
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "memoe_plugin_version": __version__,
        "model": model_identity(model),
        "tokenizer": tokenizer_fingerprint(adapter.tokenizer),
        "module": {"layer": hp.layer, "module_template": hp.module_template, "name": hp.module_name,
                   "class": type(adapter.base_module).__name__,
                   "shape": list(projection_shape(adapter.base_module)),
                   "weight_dtype": str(base_weight.dtype).replace("torch.", ""),
                   "weight_sha256": tensor_sha256(base_weight)},
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                           "sha256": tensor_sha256(t)} for name, t in tensors.items()},
        "hparams": hp.to_dict(),
        "anchors": {"routing_input": hp.routing_input, "anchor_backend": hp.anchor_backend,
                    "extractor": resolved_extractor(adapter), "feature_dim": adapter.encoder.dim,
                    "anchor_cache_size": hp.anchor_cache_size,
                    "locality_guard_keys": guard_keys(adapter)},
        "edits": [dict(edit) for edit in adapter.edits],
        "state": state,
    }
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "memoe": json.dumps(document, ensure_ascii=False, default=str)}
    atomic_save(tensors, metadata, path)
    return path
