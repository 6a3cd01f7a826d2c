"""The MEMoE bypass: one frozen projection plus a sparse mixture of experts beside it.

    h = W0 x + scale * sum_e G_e(x) * W_e x,     G = top_k(softmax(W_g R(x) + noise))

``R(x)`` is ``x`` concatenated with per-position routing features (the knowledge anchor embedding by
default), which arrive with each call in an explicit :class:`~.routing.inputs.RoutingInputs`. The
extensions of the paper are variant objects the layer dispatches to, as PEFT's LoRA layer dispatches
DoRA: the scope (:class:`~.variants.scope.ScopeVariant`: the locality guard, the key scope with its
anti-keys, the snap) decides where the bypass acts and what its experts read; key routing
(:class:`~.variants.key_routing.KeyRouter`) replaces the gate's choice. Without them
:meth:`MoEBypass.mixture` is the equation above.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .losses import switch_load_balancing_loss
from .routing.inputs import MixtureOutput, RoutingInputs
from .variants.key_routing import KeyRouter
from .variants.scope import ScopeVariant, Selection


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


class MoEBypass(nn.Module):
    """Wraps one frozen projection; only the experts and the gate are trainable.

    ``feature_dim``: the width of the routing features the gate reads beside ``x`` (0: ``x`` alone)."""

    def __init__(self, base: nn.Module, feature_dim: int, num_experts: int, top_k: int, scale: float,
                 gate_noise: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        in_features, out_features = projection_shape(base)
        self.base, self.feature_dim = base, feature_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.scale, self.gate_noise = scale, gate_noise
        device = base.weight.device
        # Zero experts: the untrained bypass adds exactly nothing.
        self.experts = nn.Parameter(torch.zeros(num_experts, in_features, out_features, device=device, dtype=dtype))
        self.gate = nn.Linear(in_features + feature_dim, num_experts, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.gate.weight, std=0.02)
        # The gate sees (R(x) - gate_shift) * gate_scale. Identity unless gate_norm: center
        # calibrates it (set_gate_normalisation), which keeps one direction common to
        # every token from dominating the gate and collapsing all routing onto one expert.
        self.register_buffer("gate_shift", torch.zeros(in_features + feature_dim, device=device, dtype=dtype))
        self.register_buffer("gate_scale", torch.ones(in_features + feature_dim, device=device, dtype=dtype))
        self.scope: Optional[ScopeVariant] = None   # the variant deciding where the bypass acts (extensions)
        self.router: Optional[KeyRouter] = None     # expert_routing: key
        self.enabled = True      # False: behave exactly like the base module
        self._learning: Optional[nn.Parameter] = None      # inside learning_only: the learning experts
        self._learning_slot: dict[int, int] = {}           # expert id -> row of _learning

    def forward(self, x: torch.Tensor, routing: Optional[RoutingInputs] = None) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        mixed = self.mixture(x, routing)
        if routing is not None and routing.outputs is not None:
            routing.outputs.append(mixed)
        return out + mixed.delta.to(out.dtype)

    def mixture(self, x: torch.Tensor, routing: Optional[RoutingInputs] = None,
                where: Optional[Selection] = None) -> MixtureOutput:
        """``scale * sum_e G_e(x) W_e x`` with ``G = top_k(softmax(W_g R(x) + noise))``, and the balance loss.

        ``where``: the scope's :class:`Selection` for ``x`` and ``routing`` when the caller has it (training computes
        it once per batch: it depends on frozen inputs and on keys that do not change while the experts learn)."""
        routing = routing or RoutingInputs()
        if where is None:
            where = self.scope.select(x, routing) if self.scope is not None else Selection.everywhere(x)
        if where.nowhere:
            return self._silent(x, where)
        if self.router is not None:
            (chosen, weights), probs = self.router.route(where), None
        else:
            logits = self.gate(self.gate_input(x, routing.features))
            if self.training and self.gate_noise > 0:
                logits = logits + torch.randn_like(logits) * self.gate_noise
            probs = logits.softmax(dim=-1)
            weights, chosen = probs.topk(self.top_k, dim=-1)
        chosen = where.restrict(chosen)
        if where.closed is None:
            delta = self.expert_sum(where.expert_input, chosen, weights)
        else:   # scope_values: a closed key's output is its kept value; the experts serve the open keys
            delta = self.expert_sum(where.expert_input, chosen.masked_fill(where.closed.unsqueeze(-1), -1), weights)
            delta = delta + self.scale * where.values.to(delta.device, delta.dtype)
        return MixtureOutput(delta, chosen.detach(), self._aux_loss(probs, chosen, routing), where.expert_input)

    def expert_sum(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``scale * sum`` over the chosen experts of weight * W_e x; ``chosen`` -1 contributes nothing. Only the
        selected experts are computed."""
        flat_x = x.reshape(-1, x.shape[-1]).to(self.experts.dtype)
        flat_chosen = chosen.reshape(-1, self.top_k)
        flat_weights = weights.reshape(-1, self.top_k).to(self.experts.dtype)
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

    def _silent(self, x: torch.Tensor, where: Selection) -> MixtureOutput:
        """No position in scope: no gate, no expert, an exact zero."""
        none = torch.full((*x.shape[:-1], self.top_k), -1, dtype=torch.long, device=x.device)
        delta = x.new_zeros(*x.shape[:-1], self.experts.shape[-1], dtype=self.experts.dtype)
        return MixtureOutput(delta, none, self._connected_zero(), where.expert_input)

    def _aux_loss(self, probs: Optional[torch.Tensor], chosen: torch.Tensor,
                  routing: RoutingInputs) -> Optional[torch.Tensor]:
        """The Switch balance loss over real tokens while training (no gate to balance under key routing)."""
        if not self.training:
            return None
        if probs is None:
            return self._connected_zero()
        mask = routing.token_mask
        keep = mask.reshape(-1) if mask is not None and mask.shape == probs.shape[:-1] else None
        return switch_load_balancing_loss(probs.reshape(-1, self.num_experts), chosen[..., 0].reshape(-1),
                                          self.num_experts, keep)

    def _connected_zero(self) -> Optional[torch.Tensor]:
        """A zero that keeps the graph connected to the gate while training, so that backward still works."""
        return self.gate.weight.sum() * 0.0 if self.training else None

    def gate_input(self, x: torch.Tensor, features: Optional[torch.Tensor]) -> torch.Tensor:
        """R(x), normalised: ``x`` alone, or concatenated with the routing features."""
        x = x.to(self.gate.weight.dtype)
        if self.feature_dim == 0:
            return (x - self.gate_shift) * self.gate_scale
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
            # the new gate rows are drawn from a generator of their own (the expert count): a resumed run grows them
            # exactly as an uninterrupted one, and the global random state is not touched
            generator = torch.Generator().manual_seed(have * 1_000_003 + count)
            rows = (torch.randn(count - have, self.gate.weight.shape[1], generator=generator) * 0.02).to(
                device=self.gate.weight.device, dtype=self.gate.weight.dtype)
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
