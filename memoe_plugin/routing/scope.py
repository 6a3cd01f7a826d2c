"""Key scope (an extension): the bypass acts only where its input resembles an input it was trained on.

The locality guard decides on a string: an edited entity in the prefix. That protects prompts
about other subjects, but every question about an edited subject passes it, so an edit about
one relation of a subject changes the model's answers about all of them. The key scope decides
on the representation. For every edit it keeps *keys*: the layer inputs ``x`` at the positions
that predict the edit's target tokens, centred and unit-normalised. A position is in scope when
its own centred input has cosine similarity at least ``threshold`` with a key of an edit whose
anchor is in sight (the guard's match, when the guard is on). A rewording of the edited question
lands near its keys; a question about another relation of the same subject does not.

The layer input of the adapted layer does not depend on the bypass (the bypass adds to that
layer's output), so keys taken before training stay valid, and the scope is causal: it looks at
position ``t``'s input only, which depends on tokens ``0..t``.

With ``snap`` > 0 (``scope_snap``) the scope also keeps each key's raw layer input, and an
in-scope position's expert reads its own input moved that share of the way to the input of the
key it matched (:meth:`KeyScope.snap_inputs`). A rewording's last token is near, not at, the edit
prompt's, and a linear expert trained on the one gives the other only part of the correction;
snapped, it gives the edit's own. ``snap`` 1 is a codebook, as GRACE's, read through the expert.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn


class Match(NamedTuple):
    """Per position: best cosine similarity to a key, the edit and the index of that key ((-1, -1, -1)
    where no key counts)."""
    similarity: torch.Tensor
    edit: torch.Tensor
    key: torch.Tensor


class KeyScope(nn.Module):
    """Keys of the edited positions, and the test of a layer input against them."""

    def __init__(self, dim: int, threshold: float, device=None, snap: float = 0.0):
        super().__init__()
        self.threshold, self.snap = threshold, snap
        self.register_buffer("center", torch.zeros(dim, device=device))
        self.register_buffer("keys", torch.zeros(0, dim, device=device, dtype=torch.float16))
        self.register_buffer("edit_ids", torch.zeros(0, dtype=torch.long, device=device))
        # raw layer input of each key (only with snap > 0: 2 bytes per feature per key)
        self.register_buffer("inputs", torch.zeros(0, dim, device=device, dtype=torch.float16))
        self.calibrated = False

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() * self.keys.element_size() + self.edit_ids.numel() * 8 +
                self.inputs.numel() * self.inputs.element_size())

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Fix the centre on real layer inputs (the first edits' tokens); keys and queries share it."""
        self.center.copy_(x.float().mean(0))
        self.calibrated = True

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() - self.center
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def add(self, x: torch.Tensor, edit_ids: torch.Tensor) -> None:
        """Keep the rows of ``x`` [n, dim] as keys of the edits ``edit_ids`` [n]."""
        keys = self._normalise(x).to(self.keys.dtype)
        self.keys = torch.cat([self.keys, keys.to(self.keys.device)])
        self.edit_ids = torch.cat([self.edit_ids, edit_ids.to(self.edit_ids.device, torch.long)])
        if self.snap > 0:
            self.inputs = torch.cat([self.inputs, x.detach().to(self.inputs.device, self.inputs.dtype)])

    @torch.no_grad()
    def truncate(self, size: int) -> None:
        """Drop the keys added after the first ``size`` (a failed edit call takes its keys back)."""
        self.keys, self.edit_ids, self.inputs = self.keys[:size], self.edit_ids[:size], self.inputs[:size]

    def match(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> Match:
        """Best cosine similarity of each row of ``x`` [..., dim] to a key, the edit that key belongs
        to and the key's index; ``allowed`` [..., n_edits] (bool) limits each row to the keys of some
        edits."""
        flat = self._normalise(x.reshape(-1, x.shape[-1]))
        if not len(self):
            none = torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)
            return Match(flat.new_full(x.shape[:-1], -1.0), none, none.clone())
        sims = flat @ self.keys.to(flat.dtype).t()                       # [rows, keys]
        if allowed is not None:
            allowed = allowed.reshape(-1, allowed.shape[-1]).to(sims.device)
            known = self.edit_ids < allowed.shape[-1]
            mask = allowed[:, self.edit_ids.clamp_max(max(allowed.shape[-1] - 1, 0))] & known
            sims = sims.masked_fill(~mask, -1.0)
        best, index = sims.max(dim=-1)
        none = best <= -1.0
        edit = self.edit_ids.to(index.device)[index].masked_fill(none, -1)
        shape = x.shape[:-1]
        return Match(best.reshape(shape), edit.reshape(shape), index.masked_fill(none, -1).reshape(shape))

    def snap_inputs(self, x: torch.Tensor, key: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """``x`` [..., dim] with the rows at ``where`` moved the share ``snap`` of the way to the raw input
        of their matched key ``key`` [...]; the other rows unchanged."""
        if self.snap <= 0 or not bool(where.any()):
            return x
        if self.inputs.shape[0] != self.keys.shape[0]:
            raise RuntimeError("scope_snap needs the keys' layer inputs, and this scope has none (it was saved "
                               "or built with scope_snap: 0). Edit again with scope_snap set.")
        where = where & (key >= 0)
        target = self.inputs[key.clamp_min(0).to(self.inputs.device)].to(x.device, x.dtype)   # rows, then cast
        return torch.where(where.unsqueeze(-1), torch.lerp(x, target, self.snap), x)

    def similarity(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.match(x, allowed).similarity

    def in_scope(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.similarity(x, allowed) >= self.threshold
