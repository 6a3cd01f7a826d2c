"""How the key scope keeps its rows: float16, or int8 with one scale per row; and rows looked up by edit id."""
from __future__ import annotations

from typing import Optional

import torch

STORAGE_DTYPES = {"float16": torch.float16, "int8": torch.int8}


def pack_rows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [n, d] as kept: float16 as they are (scales empty), or int8 with one float32 scale per row
    (``row ≈ stored * scale``, the row's largest magnitude mapped to 127; float32, as a float16 scale of a small
    row would fall among float16's subnormals)."""
    if dtype != torch.int8:
        return rows.to(dtype), rows.new_zeros(0, dtype=torch.float32)
    rows = rows.float()
    scale = rows.abs().amax(-1).clamp_min(1e-30) / 127
    return torch.round(rows / scale.unsqueeze(-1)).to(torch.int8), scale


def unpack_rows(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rows :func:`pack_rows` kept, as ``dtype``."""
    if stored.dtype != torch.int8:
        return stored.to(dtype)
    return stored.to(dtype) * scale.to(stored.device, dtype).unsqueeze(-1)


class EditIndex:
    """Rows of a tensor of edit ids, looked up by edit: the keys (or anti-keys) of the edits in sight, without a
    scan of every row. Rebuilt when the ids it indexes are replaced (keys only grow by concatenation)."""

    def __init__(self):
        self._ids: Optional[torch.Tensor] = None
        self._order = self._sorted = None

    def rows_of(self, ids: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """Indices into ``ids`` of the rows whose edit is in ``edits`` (ascending)."""
        if self._ids is not ids:
            self._order = torch.argsort(ids, stable=True)
            self._sorted, self._ids = ids[self._order], ids
        edits = edits.to(ids.device)
        lo = torch.searchsorted(self._sorted, edits)
        hi = torch.searchsorted(self._sorted, edits, right=True)
        counts = hi - lo
        if not int(counts.sum()):
            return torch.zeros(0, dtype=torch.long, device=ids.device)
        starts = torch.repeat_interleave(lo, counts)
        offsets = torch.arange(int(counts.sum()), device=ids.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)
        return self._order[starts + offsets].sort().values
