"""The scope variant: where the bypass acts and what its experts read there (an extension of the paper).

The paper's bypass acts at every position. With the locality guard (``locality_guard``) it acts only where
an edited subject is in sight; with the key scope (``scope_keys``, :class:`..routing.scope.KeyScope`) only
where a position is near an edit's key and not nearer one of its anti-keys; with the snap (``scope_snap``)
the experts read an in-scope position's input moved toward the input of the key it matched.
:class:`~..layer.MoEBypass` asks :meth:`ScopeVariant.select` for a :class:`Selection` before its gate runs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..routing.inputs import RoutingInputs
from ..routing.scope import KeyScope
from ..routing.template import TEMPLATE


class Selection(NamedTuple):
    """Where the bypass acts and what the experts read."""
    active: Optional[torch.Tensor]   # [...] bool; None: every position
    edit: Optional[torch.Tensor]     # [...] the edit whose key each position matched (-1: none); None without keys
    expert_input: torch.Tensor       # [..., in]
    closed: Optional[torch.Tensor] = None   # [...] bool (scope_values): active positions whose key is closed, whose
    #                                         output is that key's value, not an expert's; None: no closed key matched
    values: Optional[torch.Tensor] = None   # [..., out] the closed keys' values there (unscaled; zero elsewhere)

    @classmethod
    def everywhere(cls, x: torch.Tensor) -> "Selection":
        return cls(None, None, x)

    @property
    def nowhere(self) -> bool:
        return self.active is not None and not bool(self.active.any())

    def restrict(self, chosen: torch.Tensor) -> torch.Tensor:
        """``chosen`` [..., top_k] with -1 (no expert) outside the selection."""
        return chosen if self.active is None else chosen.masked_fill(~self.active.unsqueeze(-1), -1)


class ScopeVariant:
    """The guard's mask, narrowed by the key scope (``keys``, None without ``scope_keys``), and the snap.

    ``reads_block``: the key scope compares the residual stream entering an earlier block
    (``RoutingInputs.states``, ``scope_layer``) instead of the bypass input."""

    def __init__(self, keys: Optional[KeyScope] = None, reads_block: bool = False):
        self.keys, self.reads_block = keys, reads_block

    def select(self, x: torch.Tensor, routing: RoutingInputs) -> Selection:
        active = routing.active
        if active is not None:
            if active.shape != x.shape[:-1]:
                raise RuntimeError(f"MEMoE locality-guard mask {tuple(active.shape)} does not match the layer "
                                   f"input {tuple(x.shape)}")
            active = active.to(x.device)
            if not bool(active.any()):
                return Selection(active, None, x)   # the guard keeps every position out: nothing to match
        if self.keys is None:
            return Selection(active, None, x)
        allowed = routing.allowed
        if allowed is not None and allowed.shape[:-1] != x.shape[:-1]:
            allowed = None
        view, kind, readable = self.view(x, routing)
        match = self.keys.match(view, allowed, routing.sight, kind=kind)
        keyed = (match.similarity >= self.keys.threshold) & ~match.blocked
        if readable is not None:
            keyed = keyed & readable
        active = keyed if active is None else active & keyed
        closed = values = None
        if self.keys.closed:
            closed = active & (match.key >= 0) & (match.key < self.keys.closed)
            if bool(closed.any()):
                values = self.keys.key_values(match.key, closed)
            else:
                closed = None
        return Selection(active, match.edit, self.keys.snap_inputs(x, match.key, active), closed, values)

    def view(self, x: torch.Tensor, routing: RoutingInputs
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What the key scope compares at each position (a chat template token reads the conversation's last token
        before it: ``routing.source``), what each position is (``routing.kind``), and where there is anything to read
        (None: everywhere)."""
        base = x
        if self.reads_block:
            states = routing.states
            if states is None or states.shape[:-1] != x.shape[:-1]:
                got = None if states is None else tuple(states.shape)
                raise RuntimeError(f"MEMoE's key scope reads the residual stream of an earlier block (scope_layer), "
                                   f"and got {got} for the layer input {tuple(x.shape)}. Run the adapted module "
                                   "through the whole model (model(input_ids=...) or model.generate).")
            base = states.to(x.device)
        source = routing.source
        if source is not None and source.shape == x.shape[:-1]:
            source = source.to(x.device)
            readable = source >= 0
            index = source.clamp_min(0).unsqueeze(-1).expand(*source.shape, base.shape[-1])
            return torch.gather(base, -2, index), routing.kind, readable
        kind = routing.kind
        if kind is not None and routing.states is not None and kind.shape == x.shape[:-1]:
            kind = kind.to(x.device)
            views = torch.where((kind == TEMPLATE).unsqueeze(-1), routing.states.to(x.device, base.dtype), base)
            return views, kind, None
        return base, None, None
