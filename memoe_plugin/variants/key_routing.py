"""The key-routing variant (``expert_routing: key``, an extension of the paper).

The paper's gate ``top_k(softmax(W_g R(x)))`` sends every edit of a batch to one expert on SmolLM2
(routing collapse, docs/results.md). With key routing each edit has its expert (``expert_of``), and a
position goes to the expert of the edit whose key it matched in the scope, with weight 1. With
``edits_per_expert`` N, edit i gets expert i // N: the mixture grows as edits come, and only the newest
experts learn, so earlier edits' experts never change (LEMoE's recipe for sequential editing).
"""
from __future__ import annotations

from typing import Optional

import torch

from .scope import Selection


class KeyRouter:
    """Edit id -> expert, and the routing of a :class:`Selection` by it."""

    def __init__(self, device=None):
        self.expert_of = torch.zeros(0, dtype=torch.long, device=device)

    def route(self, where: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen ``[..., 1]``, weights ``[..., 1]``): the expert of the matched edit, -1 out of scope."""
        if where.edit is None:
            raise RuntimeError("key routing needs the key scope's matches (scope_keys: true)")
        edit = where.edit
        expert = self.expert_of.to(edit.device)[edit.clamp(0, max(len(self.expert_of) - 1, 0))]
        out = (edit < 0) if where.active is None else (~where.active | (edit < 0))
        chosen = expert.masked_fill(out, -1).unsqueeze(-1)
        return chosen, torch.ones(chosen.shape, device=chosen.device)

    def assign(self, first: int, count: int, per_expert: int, num_experts: int) -> Optional[list[int]]:
        """Experts of edits ``first .. first + count - 1``: edit ``i`` goes to ``i // per_expert`` (the mixture
        grows), or round ``num_experts`` without ``per_expert``. Returns the experts that learn in this call
        (None: all of them)."""
        ids = torch.arange(first, first + count, device=self.expert_of.device)
        experts = ids // per_expert if per_expert else ids % num_experts
        self.expert_of = torch.cat([self.expert_of[:first], experts])
        return sorted(set(experts.tolist())) if per_expert else None

    def truncate(self, size: int) -> None:
        """Forget the edits from ``size`` on (a failed edit call takes its own back)."""
        self.expert_of = self.expert_of[:size]

    @property
    def needed_experts(self) -> int:
        return int(self.expert_of.max()) + 1 if len(self.expert_of) else 0
