"""Model-level injector: put one :class:`MoEBypass` into a causal LM and take it out again.

The injector replaces the target module by the bypass wrapper, registers a
forward pre-hook on the whole model that turns ``input_ids``/``attention_mask``
into routing features (knowledge anchors) for every position, and follows
KV-cache generation step by step. :meth:`MEMoEAdapter.detach` puts the very
same module object back and removes every hook and attribute, so the model's
``state_dict`` is bit-identical to the original.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
from torch import nn

from .routing.anchors import RoutingFeatureEncoder, check_round_trip
from .routing.extractors import make_extractor
from .routing.guard import LocalityGuard
from .routing.scope import KeyScope
from .routing.template import ChatTemplate
from .compat import CacheNotFollowedError, bound_arguments, continuation_length
from .hparams import MEMoEHyperParams
from .layer import MoEBypass, projection_shape
from .locate import resolve_module, scope_block
from .routing.inputs import MixtureOutput, RoutingInputs
from .training.memory import OutputMemory
from .variants.key_routing import KeyRouter
from .variants.scope import ScopeVariant

ADAPTER_ATTR = "_memoe_adapter"


def get_adapter(model: nn.Module) -> Optional["MEMoEAdapter"]:
    """The adapter attached to ``model``, or None."""
    return model.__dict__.get(ADAPTER_ATTR)


class MEMoEAdapter:
    """One MEMoE bypass in one model, plus the hook that feeds it knowledge anchors."""

    def __init__(self, model: nn.Module, tokenizer, hparams: MEMoEHyperParams):
        self.model, self.tokenizer, self.hparams = model, tokenizer, hparams
        self.parent, self.attr, self.base_module = resolve_module(model, hparams)
        embedding = model.get_input_embeddings()
        needs_entities = hparams.routing_input == "anchor" or hparams.locality_guard
        if needs_entities:
            check_round_trip(tokenizer, getattr(getattr(model, "config", None), "_name_or_path", "") or
                             hparams.model_name)
        self.extractor = make_extractor(hparams.anchor_backend) if needs_entities else None
        self.encoder = RoutingFeatureEncoder(tokenizer, embedding, hparams.routing_input,
                                             self.extractor, hparams.anchor_cache_size)
        self.guard = LocalityGuard(tokenizer, hparams.anchor_cache_size) if hparams.locality_guard else None
        self.template = chat_template(tokenizer, hparams)
        generator = torch.Generator().manual_seed(hparams.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            self.bypass = MoEBypass(self.base_module, self.encoder.dim, hparams.num_experts, hparams.top_k,
                                    hparams.scale, hparams.gate_noise)
        with torch.no_grad():
            self.bypass.gate_scale[:projection_shape(self.base_module)[0]] = hparams.gate_token_weight
        self.scope, self.scope_block = None, None
        if hparams.scope_keys:
            in_features = projection_shape(self.base_module)[0]
            reads_block = hparams.scope_layer >= 0
            if reads_block:
                self.scope_block = scope_block(model, hparams)
            dim = embedding.weight.shape[1] if reads_block else in_features
            self.scope = KeyScope(dim, hparams.scope_threshold, self.base_module.weight.device, snap=hparams.scope_snap,
                                  input_dim=in_features, rank=hparams.scope_rank,
                                  anti_margin=hparams.scope_anti_margin,
                                  copy_similarity=hparams.scope_copy_similarity, storage=hparams.scope_storage,
                                  output_dim=projection_shape(self.base_module)[1] if hparams.scope_values else 0,
                                  projection=hparams.scope_projection, seed=hparams.seed,
                                  chat_reads_plain=self.template is not None and hparams.chat_first_token)
        if self.guard is not None or self.scope is not None:
            self.bypass.scope = ScopeVariant(self.scope, reads_block=self.scope_block is not None)
        if hparams.expert_routing == "key":
            self.bypass.router = KeyRouter(self.base_module.weight.device)
        self.trainable_experts: Optional[list[int]] = None   # None: every expert learns in this call
        self.routing_paused = False   # True: forward passes compute no routing inputs (the bypass is off in them)
        self._call: Optional[RoutingInputs] = None       # the routing inputs of the model call in progress
        self._record: Optional[list] = None              # inside recording(): where the bypass's outputs go
        self.bypass.eval()
        self._hooks: list = []
        self._prefixes: Optional[list[list[int]]] = None   # real ids per row, for KV-cache steps
        self._prefix_length = 0                              # positions seen so far, padding included
        self.edits: list[dict] = []                          # every request trained into the experts
        self.gate_calibrated = False                         # gate_norm: center statistics are set
        self.memory = OutputMemory(hparams.memory_rows, hparams.seed) if hparams.memory_rows else None

    # ------------------------------------------------------------ attach/detach
    @classmethod
    def attach(cls, model: nn.Module, tokenizer, hparams: MEMoEHyperParams) -> "MEMoEAdapter":
        if get_adapter(model) is not None:
            raise RuntimeError("this model already has a MEMoE adapter; use get_adapter(model) or detach it first")
        adapter = cls(model, tokenizer, hparams)
        adapter.reattach()
        return adapter

    def reattach(self) -> None:
        """Put this adapter (back) into its model, e.g. after ``detach()``: edits on again, as they were."""
        model = self.model
        if get_adapter(model) is not None:
            raise RuntimeError("this model already has a MEMoE adapter; detach it first")
        if getattr(self.parent, self.attr) is not self.base_module:
            raise RuntimeError(f"{self.hparams.module_name} is no longer the module this adapter wrapped")
        setattr(self.parent, self.attr, self.bypass)
        self._hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(self.bypass.register_forward_pre_hook(self._inject, with_kwargs=True))
        if self.scope_block is not None:
            self._hooks.append(self.scope_block.register_forward_pre_hook(self._scope_states, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._after_forward, always_call=True))
        if hasattr(model, "generate"):
            model.__dict__["generate"] = functools.partial(_guarded_generate, model, type(model).generate)
        model.__dict__[ADAPTER_ATTR] = self

    def detach(self) -> None:
        """Put the original module back; remove hooks and every attribute the adapter added."""
        if getattr(self.parent, self.attr) is self.bypass:
            setattr(self.parent, self.attr, self.base_module)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.model.__dict__.pop("generate", None)
        if self.model.__dict__.get(ADAPTER_ATTR) is self:
            del self.model.__dict__[ADAPTER_ATTR]
        self._call = None

    def configure(self, hparams: MEMoEHyperParams) -> None:
        """Take a later call's settings (the structural ones are checked equal by the caller): the bypass scale,
        the gate noise and the key scope's thresholds and snap from now on. A snap the scope kept no inputs
        for (it was built with ``scope_snap: 0``) cannot be honoured, and is refused before anything changes."""
        scope = self.scope
        if scope is not None and hparams.scope_snap > 0 and scope.snap == 0 and len(scope):
            raise ValueError(f"scope_snap = {hparams.scope_snap}, but this adapter's keys were registered with "
                             "scope_snap: 0 and kept no layer inputs to snap to; restore() and edit again with "
                             "scope_snap set")
        self.hparams = hparams
        self.bypass.scale, self.bypass.gate_noise = hparams.scale, hparams.gate_noise
        if scope is not None:
            scope.threshold, scope.snap = hparams.scope_threshold, hparams.scope_snap
            scope.anti_margin, scope.copy_similarity = hparams.scope_anti_margin, hparams.scope_copy_similarity

    # ----------------------------------------------------------------- state
    def state(self) -> tuple[dict, dict]:
        """Everything the edits put into the adapter: ``(tensors, info)``, the tensors on the CPU and the info
        JSON-able (``persist.state``). :meth:`load_state` takes them back; save_adapter writes them."""
        from .persist.state import adapter_state
        return adapter_state(self)

    @property
    def kept_bytes(self) -> int:
        """Bytes of everything the edits put into the adapter (what :meth:`state` gives and ``save_adapter`` writes)."""
        from .persist.state import kept_bytes
        return kept_bytes(self)

    def load_state(self, tensors: dict, info: dict) -> None:
        """Put a saved :meth:`state` into this (freshly attached) adapter."""
        from .persist.state import load_adapter_state
        load_adapter_state(self, tensors, info)

    # --------------------------------------------------------------- routing
    def routing_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         past_length: int = 0) -> "RoutingInputs":
        """Anchor features, token mask, guard mask and key-scope pairing of one forward call.

        ``past_length`` > 0 means the call continues the previous one through a KV
        cache: its tokens are appended to the prefixes remembered from that call.
        """
        batch, length = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]
        ids_rows, mask_rows = input_ids.tolist(), mask.tolist()
        if past_length:
            if self._prefixes is None or len(self._prefixes) != batch or self._prefix_length != past_length:
                raise CacheNotFollowedError(
                    "MEMoE cannot follow this KV cache: it does not continue the previous forward call "
                    "(beam search and hand-built caches are not supported). Run the full sequence "
                    "without a KV cache, or use greedy/sampling generate.")
            prefixes = [prefix + [t for t, m in zip(ids, ms) if m] for prefix, ids, ms
                        in zip(self._prefixes, ids_rows, mask_rows)]
        else:
            prefixes = [[t for t, m in zip(ids, ms) if m] for ids, ms in zip(ids_rows, mask_rows)]
        self._prefixes, self._prefix_length = prefixes, past_length + length
        device = input_ids.device
        weight = self.encoder.embedding.weight
        features = weight.new_zeros(batch, length, self.encoder.dim) if self.encoder.dim else None
        active = torch.zeros(batch, length, dtype=torch.bool, device=device) if self.guard else None
        pairing = self.guard is not None and self.scope is not None and len(self.scope) > 0
        source = torch.full((batch, length), -1, dtype=torch.long, device=device) if self.template else None
        kind = torch.zeros((batch, length), dtype=torch.int8, device=device) if self.template else None
        seen: list[tuple[int, int, frozenset]] = []   # (row, position, edits in sight) where some edit is
        for row, (prefix, ms) in enumerate(zip(prefixes, mask_rows)):
            positions = [i for i, m in enumerate(ms) if m]
            if not positions:
                continue
            offset = len(prefix) - len(positions)
            # the guard and the anchors read what the conversation wrote, never the chat template's own text; a
            # template token reads the conversation's last token before it (``reads``)
            own, reads = (prefix, None) if self.template is None else self.template.split(prefix)
            lift = (lambda values, empty: values[offset:]) if reads is None else \
                (lambda values, empty: [values[r] if r >= 0 else empty for r in reads[offset:]])
            if source is not None:
                at = [i for i, template in enumerate(self.template.mask(prefix)) if not template]   # own -> position
                source[row, positions] = torch.tensor([positions[at[r] - offset] if r >= 0 and at[r] >= offset
                                                       else -1 for r in reads[offset:]], device=device)
                kind[row, positions] = torch.tensor(self.template.kinds(prefix)[offset:], dtype=torch.int8,
                                                    device=device)
            if active is not None:
                flags = lift(self.guard.active(own), False)
                if not any(flags):
                    continue   # the guard silences this row: its anchors are never looked at
                active[row, positions] = torch.tensor(flags, device=device)
                if pairing:
                    seen += [(row, position, edits) for position, edits
                             in zip(positions, lift(self.guard.edits_in_sight(own), frozenset())) if edits]
            if features is not None:
                rows_of = self.encoder.features(own)
                if reads is None:
                    features[row, positions] = rows_of[offset:]
                elif len(own):
                    index = torch.tensor(reads[offset:], device=rows_of.device)
                    features[row, positions] = rows_of[index.clamp_min(0)] * (index >= 0).unsqueeze(-1)
        allowed = sight = None
        if pairing:   # one column per edit in sight, not per edit made: its size does not grow with the edits
            edits = sorted(frozenset().union(*(e for _, _, e in seen)))
            column = {edit: j for j, edit in enumerate(edits)}
            allowed = torch.zeros(batch, length, len(edits), dtype=torch.bool, device=device)
            for row, position, in_sight in seen:
                allowed[row, position, [column[e] for e in in_sight]] = True
            sight = torch.tensor(edits, dtype=torch.long, device=device)
        return RoutingInputs(features=features, token_mask=mask, active=active, allowed=allowed, sight=sight,
                             source=source, kind=kind)

    def assign_experts(self, first: int, count: int) -> None:
        """``expert_routing: key``: the experts of edits ``first .. first + count - 1``.

        With ``edits_per_expert`` N, edit ``i`` goes to expert ``i // N`` and the mixture grows as edits
        come; only the experts of this call's edits learn in it, so earlier full experts never change
        again. With N = 0 the edits go round the ``num_experts`` experts, and every expert learns.
        """
        bypass = self.bypass
        if bypass.router is None:
            return
        self.trainable_experts = bypass.router.assign(first, count, self.hparams.edits_per_expert,
                                                      self.hparams.num_experts)
        bypass.resize_experts(max(bypass.experts.shape[0], bypass.router.needed_experts))

    def register_knowledge(self, requests: list[dict], first_edit: int = 0) -> None:
        """Add the requests' knowledge anchors to the locality guard (no-op without one); request ``i``
        is edit ``first_edit + i``."""
        if self.guard is None:
            return
        for i, request in enumerate(requests):
            found = [e.text for e in self.extractor(request["prompt"])]
            subject = request.get("subject")
            if isinstance(subject, str) and subject.strip():
                found.append(subject)
            if not found:
                raise ValueError(
                    f"request {i}: locality_guard needs a knowledge anchor, but the {self.extractor.name} "
                    f"extractor finds no entity in {request['prompt']!r} and the request has no 'subject'. "
                    "Add 'subject' to the request or set locality_guard: false.")
            self.guard.add(found, first_edit + i)

    def _before_forward(self, module, args, kwargs):
        """The model is called: compute this call's routing inputs from its ids (:meth:`routing_features`)."""
        self._call = None
        if self.routing_paused:   # a pass that never reaches an enabled bypass (training.capture.scope_views)
            return None
        bound = bound_arguments(module, args, kwargs)
        input_ids = bound.get("input_ids")
        if input_ids is None:
            if self.encoder.dim == 0 and self.guard is None:
                self._call = RoutingInputs(outputs=self._record)
                return None
            raise ValueError("MEMoE needs input_ids to find knowledge anchors; this call passed "
                             "inputs_embeds only. Pass input_ids, or use routing_input: token "
                             "without locality_guard.")
        self._call = self.routing_features(input_ids, bound.get("attention_mask"),
                                           continuation_length(bound, input_ids))
        self._call.outputs = self._record
        return None

    def _inject(self, module, args, kwargs):
        """The bypass is called inside a model call: hand it that call's routing inputs, as its ``routing``."""
        if self._call is None or "routing" in kwargs:
            return None
        return args, {**kwargs, "routing": self._call}

    def _scope_states(self, module, args, kwargs):
        """The residual stream entering ``scope_layer``: what the key scope reads in this forward pass."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self._call is not None:
            self._call.states = None if hidden is None else hidden.detach()
        return None

    def _after_forward(self, module, args, kwargs, output=None):
        self._call = None
        return None

    # ------------------------------------------------------------ inspection
    @contextlib.contextmanager
    def recording(self) -> Iterator[list[MixtureOutput]]:
        """Within: every call of the bypass inside a model call appends its :class:`MixtureOutput` (routing,
        balance loss, delta) to the yielded list."""
        outer, self._record = self._record, []
        try:
            yield self._record
        finally:
            self._record = outer

    def route(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Experts chosen at every position, ``[batch, seq, top_k]`` (runs the model once)."""
        with torch.no_grad(), self.recording() as outputs:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs[-1].routing


def chat_template(tokenizer, hparams: MEMoEHyperParams) -> Optional[ChatTemplate]:
    """The tokenizer's chat template when ``hparams.chat`` asks for it (``auto``: when there is one)."""
    if hparams.chat == "off":
        return None
    if not getattr(tokenizer, "chat_template", None):
        if hparams.chat == "on":
            raise ValueError("chat: on, but this tokenizer has no chat template (tokenizer.chat_template is empty); "
                             "set chat: auto or off, or load the tokenizer of the instruct model")
        return None
    return ChatTemplate(tokenizer, hparams.anchor_cache_size)


def _guarded_generate(model, generate, *args, **kwargs):
    config = getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) if config is not None else 1)
    if beams and beams > 1:
        raise NotImplementedError("MEMoE routing follows one KV cache per sequence; beam search "
                                  f"(num_beams={beams}) reorders it. Use greedy or sampling generate.")
    return generate(model, *args, **kwargs)
