"""The fast path of training: the frozen layers below the adapter run once per batch, not per step.

The frozen model below the adapter never changes, so :class:`UpperStack` computes it once:
the adapter's input, and the residual stream right after the adapted layer without the
bypass. Each step then runs only the bypass, the layers above it and the LM head at the
target positions. With the locality guard, positions before every row's first anchor
never change either; their keys and values in the upper layers go into a KV cache once.
:func:`target_logits_function` checks the shortcut against a full forward pass and falls
back to full passes, with a warning, when the two disagree (an architecture where the
projection's output is not added straight to the residual stream).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from ..compat import CacheNotFollowedError, cache_argument_name, last_logits_only, output_cache
from ..routing.inputs import RoutingInputs
from ..variants.scope import Selection
from .batches import EditBatch, without_the_last_column
from .capture import BypassCall, capture_bypass, run_to_stage

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# model -> {(wrapped module, dtype): {"prefix" / "plain": whether that shortcut agreed with a full pass}}
VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class UpperStack:
    """Runs the model from just after the adapted layer, reusing frozen activations."""

    def __init__(self, adapter, batch: EditBatch, skip_silent_prefix: bool = True, known=None):
        """``known``: the bypass call of ``batch`` when the caller has it (a ``capture.BypassCall``: the keys were
        taken from it), which spares a full pass when a silent prefix is cut."""
        self.adapter, self.batch = adapter, batch
        model, hp = adapter.model, adapter.hparams
        layers_path = hp.module_template.split("{}")[0].rstrip(".")
        layers = model.get_submodule(layers_path)
        self.upper_layers = list(layers)[hp.layer + 1:]
        self.final_norm = find_final_norm(model)
        self.head = model.get_output_embeddings()
        if self.final_norm is None or self.head is None:
            raise LookupError("no final norm / LM head found")
        self.routing = adapter.routing_features(batch.input_ids, batch.attention_mask)
        self.start, self.cache, self.where = 0, None, None
        x = self.x = None if known is None else known.x
        self.routing.states = None if known is None else known.states
        if x is None or not skip_silent_prefix:
            self._capture()
        if adapter.bypass.scope is not None:   # frozen inputs, keys that do not change in training: once
            with torch.no_grad():
                self.where = adapter.bypass.scope.select(self.x, self.routing)
        start = self._silent_prefix_length() if skip_silent_prefix else 0
        if start > 0 and self.upper_layers:
            self._capture_after_prefix(start)
        elif self.x is x and x is not None:
            self._capture()
        self.acting = None   # with key routing: the positions where the bypass acts (``_keep_acting_rows``)
        if self.where is not None and adapter.bypass.router is not None:
            self._keep_acting_rows()

    def _keep_acting_rows(self) -> None:
        """Keep only what the bypass reads where it acts. Under key routing the bypass output depends on the
        selection alone (no gate reads the layer input or the anchors), and it is zero wherever the scope keeps a
        position out: the layer inputs of every other position (the call's largest tensors, a row of the
        projection's input width per token) need not be held while training. The same function of the same numbers,
        on the acting rows only."""
        where = self.where
        active = where.active if where.active is not None else torch.ones(where.expert_input.shape[:-1],
                                                                           dtype=torch.bool,
                                                                           device=where.expert_input.device)
        self.acting = active.nonzero(as_tuple=True)
        self.where = Selection(torch.ones(len(self.acting[0]), dtype=torch.bool, device=active.device),
                               None if where.edit is None else where.edit[self.acting],
                               where.expert_input[self.acting],
                               None if where.closed is None else where.closed[self.acting],
                               None if where.values is None else where.values[self.acting])
        self.x, self.routing = self.where.expert_input, RoutingInputs()

    def _silent_prefix_length(self) -> int:
        """Columns where the bypass adds nothing in any row, before the first target.

        The bypass acts only where the scope selects (the locality guard, the key scope: both decided on frozen
        inputs and on keys that do not change while training), so these columns' states never change in training;
        the layers above the adapter keep their keys and values in a KV cache and recompute only the columns after
        them. Rows are left-padded, so every row's answer sits in the last columns.
        """
        routing = self.routing
        active = None if self.where is None else self.where.active
        if active is None:
            return 0
        acting = active & routing.token_mask.bool().to(active.device)
        any_active = acting.any(dim=0)
        first_active = int(any_active.nonzero()[0]) if any_active.any() else active.shape[1]
        return min(first_active, int(self.batch.positions.min()))

    def _capture_after_prefix(self, start: int) -> None:
        """Fill a KV cache with the silent prefix, then capture the rest as it enters the upper layers. The bypass
        keeps reading every column (``self.x``, the full pass's): the key scope may read an earlier column (a chat
        template token reads the conversation's last token), and only the columns from ``start`` go up."""
        batch, model = self.batch, self.adapter.model
        x, states = self.x, self.routing.states
        with capture_bypass(self.adapter, stage=self.upper_layers[0]) as record:
            # every layer's keys and values of the prefix (the LM head on one column: its logits are not needed) ...
            cache = output_cache(model(**batch.model_inputs(0, start), use_cache=True, **last_logits_only(model, 1)))
        with capture_bypass(self.adapter, stage=self.upper_layers[0], stop_at_stage=True) as rest:
            # ... and the rest of the columns, up to the first layer above the adapter
            run_to_stage(model, **batch.model_inputs(start), use_cache=True, **{cache_argument_name(model): cache})
        record.bypass += rest.bypass
        record.stage += rest.stage
        self._keep(record)
        self.x, self.routing.states = x, states
        for layer in getattr(cache, "layers", [])[:self.adapter.hparams.layer + 1]:   # the layers below read none
            layer.keys, layer.values = layer.keys[..., :0, :].clone(), layer.values[..., :0, :].clone()
        truncate_cache(cache, start)
        self.start, self.cache = start, cache

    def _capture(self) -> None:
        stage = self.upper_layers[0] if self.upper_layers else self.final_norm
        with capture_bypass(self.adapter, stage=stage, stop_at_stage=True) as record:
            run_to_stage(self.adapter.model, **self.batch.model_inputs(), use_cache=False)
        self._keep(record)

    def _keep(self, record) -> None:
        """The last call's bypass input and upper-stage input (the full-length call when a prefix ran first)."""
        self.x = record.bypass[-1].x
        self.routing.states = record.bypass[-1].states
        stage = record.stage[-1]
        self.hidden, self.args, self.kwargs = stage.hidden, stage.args, stage.kwargs

    def target_logits(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The target positions' logits and the bypass's balance loss, running only the layers above it."""
        mixed = self.adapter.bypass.mixture(self.x, self.routing, self.where)
        delta = mixed.delta
        if self.acting is not None:   # the acting rows' outputs, put back in place (zero elsewhere)
            delta = delta.new_zeros(*self.batch.input_ids.shape, delta.shape[-1]).index_put(self.acting, delta)
        hidden = self.hidden + delta[:, self.start:].to(self.hidden.dtype)
        try:
            for layer in self.upper_layers:
                hidden = layer(hidden, *self.args, **self.kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        finally:
            if self.cache is not None:   # the layers appended this step's keys and values
                truncate_cache(self.cache, self.start)
        picked = hidden[self.batch.rows, self.batch.positions - self.start]
        return self.head(self.final_norm(picked)).float(), mixed.aux_loss


def truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions in every layer of a transformers ``Cache``.

    A negative argument to a cache layer's ``crop`` drops that many positions in every
    transformers 5 release (the meaning of a positive one changed)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise LookupError("this transformers cache has no per-layer crop")
    for layer in layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            try:
                layer.crop(-excess)
            except (RuntimeError, ValueError) as err:   # a sliding-window layer past its window (Gemma 3)
                raise LookupError(f"the KV cache cannot be cut back: {err}") from None
            # what is left is a slice of this step's concatenation: cut it from this step's graph, and copy it so that
            # it does not keep the whole concatenation's storage alive between steps
            layer.keys, layer.values = layer.keys.detach().clone(), layer.values.detach().clone()
        if layer.get_seq_length() > length:
            raise LookupError(f"could not truncate the KV cache to {length} positions")


def full_target_logits(adapter, batch: EditBatch) -> torch.Tensor:
    return full_logits_and_aux(adapter, batch)[0]


def full_logits_and_aux(adapter, batch: EditBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The target positions' logits from a full forward pass, and the bypass's balance loss in it. The LM head runs
    on the last columns only, where the (left-padded) rows' targets sit, where the model allows it."""
    length = batch.input_ids.shape[1]
    with adapter.recording() as outputs:
        logits = adapter.model(**batch.model_inputs(), use_cache=False,
                               **last_logits_only(adapter.model, length - int(batch.positions.min()))).logits
    aux = outputs[-1].aux_loss if outputs else None
    return logits[batch.rows, batch.positions - (length - logits.shape[1])].float(), aux


def find_final_norm(model: nn.Module) -> Optional[nn.Module]:
    base = getattr(model, "base_model", None)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@contextlib.contextmanager
def _trained_looking_experts(bypass, scale: float = 1.0):
    """Within: the experts (those that learn in this call too) hold random weights (std ``scale / sqrt(in)``), so that
    the bypass adds something and the check below compares the two paths where they can differ. Zero experts add
    nothing, and an architecture that normalises the projection's output before the residual (Gemma 3's
    post-feedforward norm) would pass the check and then train the wrong function. Put back exactly after;
    the global random state is not touched."""
    params = [p for p in (bypass.experts, bypass._learning) if p is not None]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator(device="cpu").manual_seed(0)
    try:
        with torch.no_grad():
            for p in params:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale / p.shape[1] ** 0.5
                p.copy_(noise.to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def _logits_function(adapter, batch: EditBatch, known=None):
    """The fastest correct way to get (target logits, balance loss): the cached upper stack, else full passes.

    Each shortcut (a cut silent prefix, the plain cached stack) is checked against a full pass the first time it is
    used on a model at a module and dtype; the verdict holds for that model's later batches and adapters
    (:data:`VERDICTS`): it is a property of the architecture, not of the batch, and the batch protocol's chunks each
    build an adapter of their own."""
    full = lambda: full_logits_and_aux(adapter, batch)   # noqa: E731
    failures = (LookupError, KeyError, IndexError, TypeError, CacheNotFollowedError)
    checked = VERDICTS.setdefault(adapter.model, {}).setdefault(
        (adapter.hparams.module_name, adapter.base_module.weight.dtype), {})
    if checked.get("plain") is False:
        return full, False
    try:
        try:
            if checked.get("prefix") is False:
                raise LookupError("a cut prefix disagreed with the full model on this adapter before")
            stack = UpperStack(adapter, batch, known=known)
            with torch.no_grad():
                stack.target_logits()          # a cache that cannot be cut back fails here, not mid-training
        except LookupError:                    # no silent-prefix cache on this architecture: the plain path
            stack = UpperStack(adapter, batch, skip_silent_prefix=False)
    except failures as err:
        warnings.warn(f"MEMoE: training with full forward passes ({err})")
        return full, False
    path = "prefix" if stack.cache is not None else "plain"
    if path not in checked:
        dtype = adapter.base_module.weight.dtype
        scale = HALF_PRECISION_CHECK_SCALE if dtype in HALF_PRECISION else 1.0
        with torch.no_grad():
            # half precision measures the gap against what the bypass changes (the experts are zero or trained here)
            untouched = full()[0] if dtype in HALF_PRECISION else None
            with _trained_looking_experts(adapter.bypass, scale):
                reference, shortcut = full()[0], stack.target_logits()[0]
        agree, gap = shortcut_agrees(reference, shortcut, untouched, dtype)
        checked[path] = agree
        if not agree and path == "prefix":
            stack = UpperStack(adapter, batch, skip_silent_prefix=False)   # the plain cached path, checked below
            with torch.no_grad(), _trained_looking_experts(adapter.bypass, scale):
                shortcut = stack.target_logits()[0]
            (checked["plain"], gap), path = shortcut_agrees(reference, shortcut, untouched, dtype), "plain"
        if not checked[path]:
            warnings.warn(f"MEMoE: cached activations disagree with the full model ({gap}); "
                          "training with full forward passes instead")
            return full, False
    return stack.target_logits, True


# Half precision: the shortcut and a full pass round in another order (the full pass adds the bypass output to the
# projection's output, then the residual; the shortcut adds it to their rounded sum, and picks the target rows
# before the LM head), so their logits differ by a few of the logits' own rounding steps (max gap 0.38 on
# SmolLM2-135M in bfloat16, whatever the bypass adds). Against a change the size of a strong edit (check experts
# HALF_PRECISION_CHECK_SCALE times the float32 check's) that is 1.7 % of the change on SmolLM2; a shortcut that
# computes another function (Gemma 3's normed MLP output) is off by 94-99 % of it, in float32 as in bfloat16.
HALF_PRECISION = (torch.float16, torch.bfloat16)
HALF_PRECISION_CHECK_SCALE = 100.0
HALF_PRECISION_SHARE = 0.25


def shortcut_agrees(reference: torch.Tensor, shortcut: torch.Tensor, untouched: Optional[torch.Tensor],
                    dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the shortcut's logits are the full pass's, to the precision of the model's ``dtype``, and the gap.

    ``reference`` and ``shortcut``: the target logits of a full pass and of the shortcut with the same (random) experts;
    ``untouched``: a full pass's with the bypass adding nothing new. Float32 must agree within 1e-3; half precision
    within :data:`HALF_PRECISION_SHARE` of the change the bypass makes (``reference - untouched``)."""
    gap = (reference - shortcut).abs().max().item()
    if dtype not in HALF_PRECISION:
        return torch.allclose(reference, shortcut, rtol=1e-3, atol=1e-3), f"max gap {gap:.2e}"
    change = (reference - untouched).norm().item()
    share = (reference - shortcut).norm().item() / max(change, 1e-12)
    return share <= HALF_PRECISION_SHARE, f"max gap {gap:.2e}, {share:.1%} of the bypass's change"


def bucket_logits_functions(adapter, batches: list[EditBatch], known: Optional[list] = None):
    """Per bucket, a function returning (its target logits, its balance loss); and whether all are cached.
    ``known``: each bucket's bypass call (``capture.BypassCall``) when the caller has it.

    Training calls them one at a time and backpropagates each before the next, so one bucket's graph is
    held at a time (``train_micro_batch``)."""
    known = known or [None] * len(batches)
    functions = [_logits_function(adapter, *_trimmed(batch, call)) for batch, call in zip(batches, known)]
    return [function for function, _ in functions], all(cached for _, cached in functions)


def _trimmed(batch: EditBatch, call=None):
    """``batch`` and its bypass call without the last column, which predicts no target (``without_the_last_column``)."""
    short = without_the_last_column(batch)
    width = short.input_ids.shape[1]
    if call is None or width == batch.input_ids.shape[1]:
        return short, call
    routing = copy.copy(call.routing)
    routing.states = None if call.states is None else call.states[:, :width]
    return short, BypassCall(call.x[:, :width], routing)


def target_logits_function(adapter, batches: list[EditBatch]):
    """One function returning (target logits of all buckets, mean balance loss), and whether it is cached."""
    functions, cached = bucket_logits_functions(adapter, batches)

    def logits_and_aux():
        pieces, aux = [], []
        for function in functions:
            logits, loss = function()
            pieces.append(logits)
            if loss is not None:
                aux.append(loss)
        return torch.cat(pieces), (torch.stack(aux).mean() if aux else None)

    return logits_and_aux, cached
