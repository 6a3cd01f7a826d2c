"""``scope_keys``: the keys of a call's edits, taken from the layer inputs before training."""
from __future__ import annotations

import torch

from .batches import EditBatch
from .capture import run_batches


@torch.no_grad()
def register_keys(adapter, batches: list[EditBatch], requests: list[dict], first_edit: int) -> None:
    """Add the layer inputs at the key positions of ``batches`` as keys.

    A request's keys belong to its ``_edit`` id (set by apply; replayed and prefixed copies keep
    their edit's id), else to ``first_edit`` + its index. The first call also fixes the scope's
    centre, on all real tokens of its batches.
    """
    scope = adapter.scope
    record = run_batches(adapter, batches, enabled=False)
    if not scope.calibrated:
        scope.calibrate(torch.cat([call.x[b.attention_mask.bool()] for call, b in zip(record.bypass, batches)]))
    for call, batch in zip(record.bypass, batches):
        rows, positions = key_positions(adapter, batch, call)
        ids = torch.tensor([requests[i].get("_edit", first_edit + i) for i in batch.indices.tolist()],
                           dtype=torch.long, device=rows.device)
        scope.add(call.x[rows, positions], ids[rows])


def key_positions(adapter, batch: EditBatch, call) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the keys: the target-predicting positions (``scope_positions: targets``), or
    every position after the anchor up to the last one that predicts a target (``after_anchor``; the
    anchor's own last token is left out: every prompt naming the subject has it)."""
    if adapter.hparams.scope_positions == "targets" or call.active is None:
        return batch.rows, batch.positions
    active = call.active.bool() & batch.attention_mask.bool()
    onset = active & ~torch.nn.functional.pad(active[:, :-1], (1, 0))
    last = torch.full((active.shape[0],), -1, dtype=torch.long, device=active.device)
    last.scatter_reduce_(0, batch.rows, batch.positions, reduce="amax")
    span = torch.arange(active.shape[1], device=active.device).unsqueeze(0) <= last.unsqueeze(1)
    keep = active & span & ~onset
    keep[batch.rows, batch.positions] = True
    return keep.nonzero(as_tuple=True)
