"""The adapter file on disk: one safetensors file, written atomically, read with integrity checks."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

from .identity import tensor_sha256

FORMAT_NAME = "memoe_plugin.adapter"
FORMAT_VERSION = 3
TENSOR_NAMES = ("experts", "gate.weight", "gate_shift", "gate_scale")
TENSOR_NAMES_V1 = ("experts", "gate.weight")

PathLike = Union[str, os.PathLike]


def atomic_save(tensors: dict, metadata: dict, path: Path) -> None:
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


def read_adapter_metadata(path: PathLike) -> dict:
    """The JSON document stored in an adapter file, after checking format and version."""
    return read_adapter_file(Path(path).expanduser(), tensors=False)[0]


def read_adapter_file(path: Path, tensors: bool) -> tuple[dict, dict]:
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
        if version >= 3:   # every tensor the file records (keys, expert table, memory) is checked too
            required = tuple(dict.fromkeys(required + tuple(document["tensors"])))
        missing = [name for name in required if name not in loaded]
        if missing:
            raise ValueError(f"{path}: tensor(s) {missing} are missing; the file is corrupt. Save the adapter again.")
        for name in required:
            saved = document["tensors"].get(name, {})
            tensor = loaded[name]
            if list(tensor.shape) != saved.get("shape") or tensor_sha256(tensor) != saved.get("sha256"):
                raise ValueError(f"{path}: tensor {name!r} does not match its recorded shape/checksum; the file "
                                 "is corrupt. Save the adapter again.")
    return document, loaded
