"""``gate_norm: center``: centre and scale each part of the gate input, once, on the first edits."""
from __future__ import annotations

import math

import torch

from .batches import EditBatch
from .capture import run_batches


@torch.no_grad()
def calibrate_gate(adapter, batches: list[EditBatch]) -> None:
    """Mean and RMS of the layer input over the first edits' real tokens, and of the input-embedding
    rows (the space anchors live in), fixed from then on."""
    record = run_batches(adapter, batches, enabled=False)
    x = torch.cat([call.x[b.attention_mask.bool()] for call, b in zip(record.bypass, batches)]).float()
    x_mean = x.mean(0)
    x_rms = (x - x_mean).pow(2).mean().sqrt().item()
    feature_mean, feature_rms = None, 1.0
    if adapter.encoder.dim:
        rows = adapter.encoder.embedding.weight.detach().float()
        feature_mean = rows.mean(0)
        feature_rms = (rows - feature_mean).pow(2).mean().sqrt().item()
    weight = adapter.hparams.gate_token_weight
    adapter.bypass.set_gate_normalisation(x_mean, x_rms / weight if weight else math.inf, feature_mean, feature_rms)
    adapter.gate_calibrated = True
