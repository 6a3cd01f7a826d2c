"""Run the model and keep what enters the bypass: the one place that hooks the bypass input.

Training caches the frozen activations below the adapter (``fast_path``), the gate's
normalisation is calibrated on the edits' layer inputs (``calibration``), and the output
memory stores the edited positions' inputs (``memory``): all three run the model inside
:func:`capture_bypass` and read what it recorded.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..compat import cache_argument_name
from ..routing.inputs import RoutingInputs


@dataclass
class BypassCall:
    """One call of the bypass: its input and the routing inputs it ran with."""
    x: torch.Tensor
    routing: RoutingInputs

    @property
    def active(self) -> Optional[torch.Tensor]:
        return self.routing.active

    @property
    def states(self) -> Optional[torch.Tensor]:
        return self.routing.states


@dataclass
class StageCall:
    """One call of a module above the adapter: its hidden-state input and its other arguments."""
    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass
class Capture:
    bypass: list[BypassCall] = field(default_factory=list)
    stage: list[StageCall] = field(default_factory=list)


@contextlib.contextmanager
def capture_bypass(adapter, enabled: bool = False, stage: Optional[nn.Module] = None, stop_at_stage: bool = False):
    """Within: no grad, the bypass on (``enabled``) or off, and every call of the bypass (and of
    ``stage``, when given) recorded in the yielded :class:`Capture`. ``stop_at_stage``: once the stage's input is
    recorded the forward pass ends (:func:`run_to_stage`): nothing above it is computed."""
    bypass, record = adapter.bypass, Capture()

    def grab_bypass(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        routing = kwargs.get("routing") or RoutingInputs()
        record.bypass.append(BypassCall(x.detach(), dataclasses.replace(routing, outputs=None)))

    def grab_stage(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        record.stage.append(StageCall(hidden.detach(), args[1:],
                                      {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if stop_at_stage:
            raise _Stop

    handles = [bypass.register_forward_pre_hook(grab_bypass, with_kwargs=True)]
    if stage is not None:
        handles.append(stage.register_forward_pre_hook(grab_stage, with_kwargs=True))
    was_enabled, bypass.enabled = bypass.enabled, enabled
    try:
        with torch.no_grad():
            yield record
    finally:
        bypass.enabled = was_enabled
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    """Raised once what a capture needs is recorded: the layers above are not run."""


SHARED_HEAD_MIN = 8   # tokens every row of a batch must share before they are run once


def _shared_head(input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor) -> int:
    """How many leading tokens every (right-padded) row shares, when at least :data:`SHARED_HEAD_MIN` and before
    every row's last token; else 0."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    length = int(same.int().cumprod(0).sum())
    length = min(length, int(last.min()))
    return length if length >= SHARED_HEAD_MIN else 0


def _head_cache(model, head: torch.Tensor, seen: list):
    """The KV cache of ``head`` [1, length] in the layers below the capture's stop (which ends the pass)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    try:
        model(input_ids=head, use_cache=True, **{cache_argument_name(model): cache})
    except _Stop:
        pass
    seen.clear()
    return cache


def run_to_stage(model, **inputs) -> None:
    """Run ``model`` inside ``capture_bypass(..., stop_at_stage=True)``: up to the stage, which ends the pass."""
    try:
        model(**inputs)
    except _Stop:
        pass


def run_batches(adapter, batches, enabled: bool = False) -> Capture:
    """Run each batch (no cache) inside :func:`capture_bypass`, up to and including the bypass: what it reads and
    the routing inputs it ran with are recorded, and the layers above it are not run."""
    def stop(module, args, output):
        raise _Stop

    with capture_bypass(adapter, enabled=enabled) as record:
        handle = adapter.bypass.register_forward_hook(stop)
        try:
            for batch in batches:
                try:
                    adapter.model(**batch.model_inputs(), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
    return record


@contextlib.contextmanager
def unedited(adapter):
    """Within: the model computes as the unedited model does (the bypass off, no routing inputs computed)."""
    was_enabled, adapter.bypass.enabled = adapter.bypass.enabled, False
    adapter.routing_paused = True
    try:
        yield
    finally:
        adapter.bypass.enabled, adapter.routing_paused = was_enabled, False


@torch.no_grad()
def scope_views(adapter, texts: list[str], batch_size: int = 64, own_last: bool = False,
                progress: Optional[str] = None) -> torch.Tensor:
    """What the key scope reads at the last token of each text (``[len(texts), dim]``), from the unedited model;
    ``own_last``: at the last token that is not the chat template's own (texts asked through the template);
    ``progress``: a progress bar with this label.

    Each batch runs only up to the block the scope reads (the bypass, or ``scope_layer``), and only up to the last
    token read."""
    from .batches import build_prompt_batch
    bypass = adapter.bypass
    target = adapter.scope_block if adapter.scope_block is not None else bypass
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    views = []
    handle = target.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with unedited(adapter):
            starts = range(0, len(texts), batch_size)
            if progress:
                from tqdm.auto import tqdm
                starts = tqdm(starts, desc=progress, unit="batch", leave=False)
            for lo in starts:
                input_ids, attention_mask, last = build_prompt_batch(adapter.tokenizer, texts[lo:lo + batch_size],
                                                                     bypass.experts.device)
                if own_last and adapter.template is not None:
                    lengths = attention_mask.sum(1).tolist()   # right-padded: the real tokens come first
                    last = torch.tensor([adapter.template.last_own(ids[:n])
                                         for ids, n in zip(input_ids.tolist(), lengths)], device=last.device)
                # causal attention: the tokens after the last one read (the template's tail) change no view
                keep = int(last.max()) + 1
                input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
                shared = _shared_head(input_ids, attention_mask, last)
                seen.clear()
                try:
                    if shared:   # a head every row starts with (a chat template's system turn): once, then the rest
                        cache = _head_cache(adapter.model, input_ids[:1, :shared], seen)
                        input_ids = input_ids[:, shared:]   # the mask covers the head too
                        cache.batch_repeat_interleave(len(last))
                        last = last - shared
                        adapter.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                      **{cache_argument_name(adapter.model): cache})
                    else:
                        adapter.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _Stop:
                    pass
                views.append(seen[0][torch.arange(len(last), device=last.device), last].float())
    finally:
        handle.remove()
    width = adapter.scope.center.shape[0]
    return torch.cat(views) if views else torch.zeros(0, width, device=bypass.experts.device)
