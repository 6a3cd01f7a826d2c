"""The MEMoE bypass: one frozen projection plus a sparse mixture of experts beside it.

    h = W0 x + scale * sum_e G_e(x) * W_e x,     G = top_k(softmax(W_g R(x) + noise))

``R(x)`` is ``x`` concatenated with per-position routing features (the knowledge
anchor embedding by default); the features come from a :class:`RoutingContext`
that the model-level injector fills before every forward pass, because EasyEdit
and ``generate`` call the model with token ids only. With the key scope's
``scope_snap`` the experts read ``x`` moved toward the input of the key it matched
(:meth:`routing.scope.KeyScope.snap_inputs`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .losses import switch_load_balancing_loss
from .routing.scope import Match


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 style Conv1D, else TypeError."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(
        f"MEMoE wraps a linear projection (torch.nn.Linear or transformers' Conv1D), "
        f"not {type(module).__name__}. Point module_template at the FFN output projection, "
        f"e.g. model.layers.{{}}.mlp.down_proj (Llama) or transformer.h.{{}}.mlp.c_proj (GPT-2).")


class RoutingContext:
    """Per-position routing features of the forward pass in progress.

    ``features`` is ``[batch, seq, dim]`` (or None when the gate sees the token
    only); ``token_mask`` marks real (non-padding) positions for the balance loss;
    ``active`` is the locality guard's ``[batch, seq]`` mask (None: everywhere) and
    ``allowed`` the ``[batch, seq, edits]`` mask of the edits whose anchors each
    position sees, which the key scope compares it with (None: every edit). ``states``
    is what the key scope reads when it reads the residual stream of an earlier block
    (``scope_layer``), filled by a hook on that block during the same forward pass.
    """

    def __init__(self, feature_dim: int):
        self.feature_dim = feature_dim
        self.features: Optional[torch.Tensor] = None
        self.token_mask: Optional[torch.Tensor] = None
        self.active: Optional[torch.Tensor] = None
        self.allowed: Optional[torch.Tensor] = None
        self.states: Optional[torch.Tensor] = None

    def set(self, features: Optional[torch.Tensor], token_mask: Optional[torch.Tensor],
            active: Optional[torch.Tensor] = None, allowed: Optional[torch.Tensor] = None,
            states: Optional[torch.Tensor] = None) -> None:
        self.features, self.token_mask, self.active, self.allowed = features, token_mask, active, allowed
        self.states = states

    def clear(self) -> None:
        self.features = self.token_mask = self.active = self.allowed = self.states = None


class MoEBypass(nn.Module):
    """Wraps one frozen projection; only the experts and the gate are trainable."""

    def __init__(self, base: nn.Module, context: RoutingContext, num_experts: int, top_k: int,
                 scale: float, gate_noise: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        in_features, out_features = projection_shape(base)
        self.base = base
        self.context = context
        self.num_experts, self.top_k = num_experts, top_k
        self.scale, self.gate_noise = scale, gate_noise
        device = base.weight.device
        # Zero experts: the untrained bypass adds exactly nothing.
        self.experts = nn.Parameter(torch.zeros(num_experts, in_features, out_features, device=device, dtype=dtype))
        self.gate = nn.Linear(in_features + context.feature_dim, num_experts, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.gate.weight, std=0.02)
        # The gate sees (R(x) - gate_shift) * gate_scale. Identity unless gate_norm: center
        # calibrates it (set_gate_normalisation), which keeps one direction common to
        # every token from dominating the gate and collapsing all routing onto one expert.
        gate_dim = in_features + context.feature_dim
        self.register_buffer("gate_shift", torch.zeros(gate_dim, device=device, dtype=dtype))
        self.register_buffer("gate_scale", torch.ones(gate_dim, device=device, dtype=dtype))
        self.scope = None        # a routing.scope.KeyScope when scope_keys is on
        self.scope_reads_block = False   # the scope reads context.states (scope_layer), not the bypass input
        self.expert_of: Optional[torch.Tensor] = None   # expert_routing: key: edit id -> expert
        self.enabled = True      # False: behave exactly like the base module
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_routing: Optional[torch.Tensor] = None   # [batch, seq, top_k] expert ids
        self._learning: Optional[nn.Parameter] = None      # inside learning_only: the learning experts
        self._learning_slot: dict[int, int] = {}           # expert id -> row of _learning

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * sum_e G_e W_e x, computed for the selected experts only (``x`` snapped in scope)."""
        active, match = self._active_mask(x)
        if active is not None and not bool(active.any()):
            return self._silent(x)   # the locality guard keeps every position out: no gate, no expert
        expert_input = self._snapped(x, active, match)
        if self.expert_of is not None:
            return self._expert_sum(expert_input, *self._key_routing(active, match.edit))
        gate_input = self._gate_input(x)
        logits = self.gate(gate_input)
        if self.training and self.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.gate_noise
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if active is not None:
            chosen = chosen.masked_fill(~active.unsqueeze(-1), -1)   # -1: no expert (guarded)
        self.last_routing = chosen.detach()
        if self.training:
            self.aux_loss = self._balance_loss(probs, chosen)
        return self._expert_sum(expert_input, chosen, weights)

    @torch.no_grad()
    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the experts read at each position: ``x``, snapped toward the matched key's input in
        scope (``scope_snap``)."""
        active, match = self._active_mask(x)
        return self._snapped(x, active, match)

    @torch.no_grad()
    def key_routes(self, x: torch.Tensor, states: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """expert_routing: key. For each row of ``x``: the input the experts read (snapped in scope) and the
        expert it goes to (``[..., 1]``, -1 for none), as :meth:`delta` routes it when no guard mask is
        set. With the keys fixed, :meth:`routed_delta` on these gives what ``delta(x)`` gives. ``states``: what the
        scope reads for these rows when it reads an earlier block (``scope_layer``)."""
        if self.scope is None or self.expert_of is None:
            raise ValueError("key_routes needs key routing (expert_routing: key)")
        saved = self.context.states
        self.context.states = None if states is None else states.to(x.device)
        try:
            active, match = self._active_mask(x)
        finally:
            self.context.states = saved
        return self._snapped(x, active, match), self._key_experts(active, match.edit)

    def routed_delta(self, expert_input: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """scale * W_e x for rows already routed by :meth:`key_routes` (weight 1, as key routing gives)."""
        return self._expert_sum(expert_input, chosen, torch.ones(chosen.shape, dtype=self.experts.dtype,
                                                                 device=chosen.device))

    def _snapped(self, x: torch.Tensor, active: Optional[torch.Tensor], match: Optional[Match]) -> torch.Tensor:
        if match is None or active is None:
            return x
        return self.scope.snap_inputs(x, match.key, active)

    def _key_experts(self, active: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        """The expert of the edit whose key each position matches best (``[..., 1]``; -1 out of scope)."""
        expert = self.expert_of.to(matched.device)[matched.clamp(0, len(self.expert_of) - 1)]
        return expert.masked_fill(~active | (matched < 0), -1).unsqueeze(-1)

    def _key_routing(self, active: torch.Tensor, matched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """expert_routing: key. Each position goes to the expert of the edit whose key it matches best,
        with weight 1 (the scope already decided that it matches one)."""
        chosen = self._key_experts(active, matched)
        self.last_routing = chosen.detach()
        if self.training:   # no gate to balance; keeps the graph connected for backward
            self.aux_loss = self.gate.weight.sum() * 0.0
        return chosen, torch.ones(chosen.shape, dtype=self.experts.dtype, device=chosen.device)

    def _expert_sum(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over the chosen experts of weight * W_e x; ``chosen`` -1 contributes nothing."""
        flat_x = x.reshape(-1, x.shape[-1]).to(self.experts.dtype)
        flat_chosen = chosen.reshape(-1, self.top_k)
        flat_weights = weights.reshape(-1, self.top_k)
        if self.top_k == 1:
            first = flat_chosen[0, 0]
            if bool((flat_chosen == first).all()) and int(first) >= 0:   # one expert for every position
                out = (flat_x @ self.expert_weight(int(first))) * flat_weights
                return (self.scale * out).reshape(*x.shape[:-1], -1)
        out = flat_x.new_zeros(flat_x.shape[0], self.experts.shape[-1])
        for e in range(self.experts.shape[0]):
            rows, slot = (flat_chosen == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            contribution = (flat_x[rows] @ self.expert_weight(e)) * flat_weights[rows, slot].unsqueeze(-1)
            out = out.index_add(0, rows, contribution)
        return (self.scale * out).reshape(*x.shape[:-1], -1)

    def _silent(self, x: torch.Tensor) -> torch.Tensor:
        self.last_routing = torch.full((*x.shape[:-1], self.top_k), -1, dtype=torch.long, device=x.device)
        if self.training:   # keeps the graph connected so that backward still works
            self.aux_loss = self.gate.weight.sum() * 0.0
        return x.new_zeros(*x.shape[:-1], self.experts.shape[-1], dtype=self.experts.dtype)

    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.gate.weight.dtype)
        if self.context.feature_dim == 0:
            return (x - self.gate_shift) * self.gate_scale
        features = self.context.features
        if features is None or features.shape[:-1] != x.shape[:-1]:
            got = None if features is None else tuple(features.shape)
            raise RuntimeError(
                f"MEMoE routing features {got} do not match the layer input {tuple(x.shape)}. "
                "The adapted module must be run through the whole model (model(input_ids=...) "
                "or model.generate), which computes the knowledge anchors first.")
        joint = torch.cat([x, features.to(device=x.device, dtype=x.dtype)], dim=-1)
        return (joint - self.gate_shift) * self.gate_scale

    @torch.no_grad()
    def set_gate_normalisation(self, x_mean: torch.Tensor, x_rms: float,
                               feature_mean: Optional[torch.Tensor] = None, feature_rms: float = 1.0) -> None:
        """Centre each part of R(x) and give each part unit root-mean-square norm per feature."""
        in_features = x_mean.shape[0]
        self.gate_shift[:in_features] = x_mean
        self.gate_scale[:in_features] = 1.0 / max(x_rms, 1e-8)   # x_rms = inf: token part off
        if feature_mean is not None:
            self.gate_shift[in_features:] = feature_mean
            self.gate_scale[in_features:] = 1.0 / max(feature_rms, 1e-8)

    def _active_mask(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[Match]]:
        """Where the bypass acts (the guard's positions, narrowed to the key scope's; None = everywhere),
        and, with the key scope, the key each position matches best (:class:`routing.scope.Match`)."""
        active = self.context.active
        if active is not None:
            if active.shape != x.shape[:-1]:
                raise RuntimeError(f"MEMoE locality-guard mask {tuple(active.shape)} does not match the layer "
                                   f"input {tuple(x.shape)}")
            active = active.to(x.device)
            if not bool(active.any()):
                return active, None
        matched = None
        if self.scope is not None:
            allowed = self.context.allowed
            if allowed is not None and allowed.shape[:-1] != x.shape[:-1]:
                allowed = None
            matched = self.scope.match(self._scope_view(x), allowed)
            keyed = (matched.similarity >= self.scope.threshold) & ~matched.blocked
            active = keyed if active is None else active & keyed
        return active, matched

    def _scope_view(self, x: torch.Tensor) -> torch.Tensor:
        """What the key scope reads: the bypass input, or the residual stream that entered ``scope_layer``."""
        if not self.scope_reads_block:
            return x
        states = self.context.states
        if states is None or states.shape[:-1] != x.shape[:-1]:
            got = None if states is None else tuple(states.shape)
            raise RuntimeError(f"MEMoE's key scope reads the residual stream of an earlier block (scope_layer), and "
                               f"got {got} for the layer input {tuple(x.shape)}. Run the adapted module through the "
                               "whole model (model(input_ids=...) or model.generate).")
        return states.to(x.device)

    def _balance_loss(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The Switch balance loss over real, unguarded tokens."""
        mask = self.context.token_mask
        keep = mask.reshape(-1) if mask is not None and mask.shape == probs.shape[:-1] else None
        return switch_load_balancing_loss(probs.reshape(-1, self.num_experts), chosen[..., 0].reshape(-1),
                                          self.num_experts, keep)

    @torch.no_grad()
    def resize_experts(self, count: int) -> None:
        """Grow (with zero experts and fresh gate rows) or shrink the mixture to ``count`` experts."""
        have = self.experts.shape[0]
        if count == have:
            return
        if count < have:
            experts, gate = self.experts[:count], self.gate.weight[:count]
        else:
            zeros = self.experts.new_zeros(count - have, *self.experts.shape[1:])
            rows = torch.empty(count - have, self.gate.weight.shape[1], dtype=self.gate.weight.dtype,
                               device=self.gate.weight.device)
            nn.init.normal_(rows, std=0.02)
            experts, gate = torch.cat([self.experts, zeros]), torch.cat([self.gate.weight, rows])
        self.experts = nn.Parameter(experts.clone(), requires_grad=False)
        self.gate.weight = nn.Parameter(gate.clone(), requires_grad=False)
        self.gate.out_features = self.num_experts = count

    def expert_weight(self, e: int) -> torch.Tensor:
        """W_e ``[in, out]``: from the learning parameter inside :meth:`learning_only`, else from ``experts``."""
        slot = self._learning_slot.get(e)
        return self.experts[e] if slot is None else self._learning[slot]

    @contextmanager
    def learning_only(self, ids: Optional[list[int]]) -> Iterator[nn.Parameter]:
        """Within, only the experts ``ids`` (None: all) can learn, and the parameter to optimise is yielded.

        With ``ids``, those experts are read from a parameter of their own; ``experts`` gets no gradient
        and no optimizer state. One expert per block of edits (``edits_per_expert``) would otherwise make
        every step's backward and Adam update cost grow with every expert kept, for experts that never
        change. On a normal exit the learned weights are written into ``experts``; after an exception
        ``experts`` is left as it was.
        """
        if ids is None or sorted(ids) == list(range(self.experts.shape[0])):
            yield self.experts
            return
        index = torch.tensor(ids, dtype=torch.long, device=self.experts.device)
        learning = nn.Parameter(self.experts.detach()[index])   # indexing with a tensor copies
        self._learning, self._learning_slot = learning, {int(e): i for i, e in enumerate(ids)}
        try:
            yield learning
            with torch.no_grad():
                self.experts[index] = learning.detach()
        finally:
            self._learning, self._learning_slot = None, {}

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.experts, self.gate.weight]
