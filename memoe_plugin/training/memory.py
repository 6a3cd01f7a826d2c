"""Output memory: an extension against forgetting in sequential editing (``memory_rows``).

After each edit call, the layer inputs ``x`` of the edited prompts at the positions
the bypass acts on are kept, with their routing features and the bypass output
``delta(x)`` the call trained. Later calls add a penalty for moving those outputs:

    loss += memory_weight * |delta(x_old) - delta_old|^2 / |delta_old|^2

on ``memory_batch`` stored rows drawn per step. It is replay in the adapter's input
space: it costs one expert product per stored row, with no layer above the adapter
run again, where replaying whole requests (``replay``) reruns the upper stack. The
memory holds at most ``memory_rows`` rows (reservoir sampling over everything seen),
in float16; ``save_adapter`` writes it with the adapter (:meth:`OutputMemory.state`), so that a
loaded adapter or a resumed run keeps editing exactly as it would have.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional

import torch

from ..layer import MoEBypass
from ..routing.inputs import RoutingInputs
from ..routing.template import TEMPLATE
from .capture import run_batches


class MemoryRoutes(NamedTuple):
    """Stored rows routed once for one edit call (:meth:`OutputMemory.routes_on`)."""
    rows: torch.Tensor     # [n] indices into the memory
    inputs: torch.Tensor   # [n, in] the input the experts read at each row (snapped in scope)
    chosen: torch.Tensor   # [n, 1] the expert each row goes to


class OutputMemory:
    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.x: Optional[torch.Tensor] = None          # [rows, in]
        self.features: Optional[torch.Tensor] = None   # [rows, feature_dim], None without routing features
        self.states: Optional[torch.Tensor] = None     # [rows, dim] what the key scope read (scope_layer, or at a
        #                                                chat template token: the conversation's last token), or None
        self.kind: Optional[torch.Tensor] = None       # [rows] (int8) what each row was for the key scope
        #                                                (routing.template), or None without a chat template
        self.delta: Optional[torch.Tensor] = None      # [rows, out]
        self.seen = 0
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return 0 if self.x is None else self.x.shape[0]

    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON-able info) that :meth:`load_state` takes back: the rows, the count seen and the
        reservoir's random state."""
        tensors = {} if self.x is None else {"memory.x": self.x, "memory.delta": self.delta}
        if self.features is not None:
            tensors["memory.features"] = self.features
        if self.states is not None:
            tensors["memory.states"] = self.states
        if self.kind is not None:
            tensors["memory.kind"] = self.kind
        version, internal, gauss = self._rng.getstate()
        return tensors, {"capacity": self.capacity, "seen": self.seen,
                         "rng": [version, list(internal), gauss]}

    def load_state(self, tensors: dict, info: dict) -> None:
        self.x, self.delta = tensors.get("memory.x"), tensors.get("memory.delta")
        self.features = tensors.get("memory.features")
        self.states = tensors.get("memory.states")
        self.kind = tensors.get("memory.kind")
        self.seen = int(info["seen"])
        version, internal, gauss = info["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.features, self.delta, self.states,
                                                           self.kind) if t is not None)

    def add(self, x: torch.Tensor, features: Optional[torch.Tensor], delta: torch.Tensor,
            states: Optional[torch.Tensor] = None, kind: Optional[torch.Tensor] = None) -> None:
        """Keep new rows; past ``capacity``, each row seen so far stays with equal probability."""
        x, delta = x.detach().half(), delta.detach().half()
        features = None if features is None else features.detach().half()
        states = None if states is None else states.detach().half()
        kind = None if kind is None else kind.detach().to(torch.int8)
        if self.x is None:
            self.x, self.delta = x[:0], delta[:0]
            self.features = None if features is None else features[:0]
            self.states = None if states is None else states[:0]
            self.kind = None if kind is None else kind[:0]
        keep_new, replace = [], []
        for i in range(x.shape[0]):
            self.seen += 1
            if len(self) + len(keep_new) < self.capacity:
                keep_new.append(i)
            else:
                slot = self._rng.randrange(self.seen)
                if slot < self.capacity:
                    replace.append((slot, i))
        for slot, i in replace:   # replacements land in rows that already exist
            if slot < len(self):
                self.x[slot], self.delta[slot] = x[i], delta[i]
                if features is not None:
                    self.features[slot] = features[i]
                if states is not None:
                    self.states[slot] = states[i]
                if kind is not None:
                    self.kind[slot] = kind[i]
        if keep_new:
            index = torch.tensor(keep_new, dtype=torch.long, device=x.device)
            self.x = torch.cat([self.x, x[index]])
            self.delta = torch.cat([self.delta, delta[index]])
            if features is not None:
                self.features = torch.cat([self.features, features[index]])
            if states is not None:
                self.states = torch.cat([self.states, states[index]])
            if kind is not None:
                self.kind = torch.cat([self.kind, kind[index]])

    @torch.no_grad()
    def routes_on(self, bypass: MoEBypass, experts: list[int], chunk: int = 4096) -> MemoryRoutes:
        """The stored rows that key routing sends to one of ``experts``, with the input the experts read
        there and the expert each goes to. Rows on other, frozen experts cannot move, so drawing them
        would only dilute the penalty: the more edits were kept, the less it would defend the experts
        that still learn. Within one edit call neither the rows nor the keys change, so the trainer
        routes them once here; matching the drawn rows against every key at every step instead cost
        time that grew with the number of edits kept."""
        if bypass.scope is None or bypass.router is None:
            raise ValueError("routes_on needs key routing (expert_routing: key)")
        wanted = torch.zeros(bypass.experts.shape[0], dtype=torch.bool, device=bypass.experts.device)
        wanted[experts] = True
        rows, inputs, chosen = [], [], []
        for lo in range(0, len(self), chunk):
            states = None if self.states is None else self.states[lo:lo + chunk].to(bypass.experts.device)
            kind = None if self.kind is None else self.kind[lo:lo + chunk]
            where = bypass.scope.select(self.x[lo:lo + chunk].to(bypass.experts.dtype),
                                        RoutingInputs(states=states, kind=kind))
            x, expert = where.expert_input, bypass.router.route(where)[0]
            keep = (expert[:, 0] >= 0) & wanted[expert[:, 0].clamp_min(0).to(wanted.device)]
            rows.append(keep.nonzero().flatten() + lo)
            inputs.append(x[keep])
            chosen.append(expert[keep])
        if not rows:   # an empty memory
            device = bypass.experts.device
            return MemoryRoutes(torch.zeros(0, dtype=torch.long, device=device),
                                bypass.experts.new_zeros(0, bypass.experts.shape[1]),
                                torch.zeros(0, 1, dtype=torch.long, device=device))
        return MemoryRoutes(torch.cat(rows), torch.cat(inputs), torch.cat(chosen))

    def rows_on(self, bypass: MoEBypass, experts: list[int]) -> torch.Tensor:
        """Indices of the stored rows that key routing sends to one of ``experts`` (:meth:`routes_on`)."""
        return self.routes_on(bypass, experts).rows

    def loss(self, bypass: MoEBypass, batch: int, routes: Optional[MemoryRoutes] = None) -> Optional[torch.Tensor]:
        """Relative squared change of the bypass output on ``batch`` stored rows, drawn from ``routes``
        (:meth:`routes_on`; default: all rows, routed afresh). None when there is nothing to draw."""
        pool = len(self) if routes is None else len(routes.rows)
        if not pool:
            return None
        pick = torch.randperm(pool)[:batch].to(self.x.device)
        if routes is not None:   # routed once per call: weight 1, as key routing gives
            chosen = routes.chosen[pick]
            now = bypass.expert_sum(routes.inputs[pick], chosen, torch.ones(chosen.shape, device=chosen.device))
            index = routes.rows[pick]
        else:
            index, dtype = pick, bypass.experts.dtype
            x = self.x[index].to(dtype).unsqueeze(0)
            features = None if self.features is None else self.features[index].to(dtype).unsqueeze(0)
            states = None if self.states is None else self.states[index].unsqueeze(0)
            kind = None if self.kind is None else self.kind[index].unsqueeze(0)
            now = bypass.mixture(x, RoutingInputs(features=features, states=states, kind=kind)).delta[0]
        old = self.delta[index].to(now.dtype)
        return (now - old).pow(2).sum(-1).mean() / old.pow(2).sum(-1).mean().clamp_min(1e-12)


@torch.no_grad()
def remember_edits(adapter, batches) -> None:
    """Add the edited prompts' positions where an expert acts (the input it reads there, and what the bypass
    now gives them) to the memory."""
    memory, bypass = adapter.memory, adapter.bypass
    if memory is None:
        return
    for call in run_batches(adapter, batches, enabled=True).bypass:
        routing = call.routing
        rows = torch.ones(call.x.shape[:-1], dtype=torch.bool, device=call.x.device)
        if routing.token_mask is not None and routing.token_mask.shape == rows.shape:
            rows &= routing.token_mask.bool().to(rows.device)
        if routing.active is not None:
            rows &= routing.active.to(rows.device)
        mixed = bypass.mixture(call.x, routing)
        # only where an expert acted: a position the key scope kept out has a zero output, and kept, it
        # would forbid a later edit whose key lands near it to act there
        rows &= (mixed.routing >= 0).any(-1).to(rows.device)
        # with scope_snap, keep the input the experts read: a raw row could snap to another key once
        # later edits add keys near it, and its stored output could then never be met again
        x, delta = mixed.expert_input, mixed.delta
        features = None if routing.features is None else routing.features[rows]
        states, kind = call.states, None
        if routing.source is not None and bypass.scope is not None:   # a chat template token reads an earlier one
            views, kind, _ = bypass.scope.view(call.x, routing)
            states = torch.where((kind == TEMPLATE).unsqueeze(-1), views, x if states is None else states)
            kind = kind[rows]
        memory.add(x[rows], features, delta[rows], None if states is None else states[rows], kind)
