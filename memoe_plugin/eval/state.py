"""A fingerprint of a model's weights, to check that a rollback restored it bit for bit."""
from __future__ import annotations

import hashlib


def state_fingerprint(model) -> str:
    """blake2b over every state_dict key, shape, dtype and byte: equal iff the model is bit-identical."""
    import torch
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
