"""Run the model and keep what enters the bypass: the one place that hooks the bypass input.

Training caches the frozen activations below the adapter (``fast_path``), the gate's
normalisation is calibrated on the edits' layer inputs (``calibration``), and the output
memory stores the edited positions' inputs (``memory``): all three run the model inside
:func:`capture_bypass` and read what it recorded.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class BypassCall:
    """One call of the bypass: its input and the routing context it ran under."""
    x: torch.Tensor
    features: Optional[torch.Tensor]
    token_mask: Optional[torch.Tensor]
    active: Optional[torch.Tensor]
    allowed: Optional[torch.Tensor]


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
def capture_bypass(adapter, enabled: bool = False, stage: Optional[nn.Module] = None):
    """Within: no grad, the bypass on (``enabled``) or off, and every call of the bypass (and of
    ``stage``, when given) recorded in the yielded :class:`Capture`."""
    bypass, record = adapter.bypass, Capture()

    def grab_bypass(module, args):
        context = adapter.context
        record.bypass.append(BypassCall(args[0].detach(), context.features, context.token_mask, context.active,
                                        context.allowed))

    def grab_stage(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        record.stage.append(StageCall(hidden.detach(), args[1:],
                                      {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    handles = [bypass.register_forward_pre_hook(grab_bypass)]
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


def run_batches(adapter, batches, enabled: bool = False) -> Capture:
    """Run each batch through the whole model (no cache) inside :func:`capture_bypass`."""
    with capture_bypass(adapter, enabled=enabled) as record:
        for batch in batches:
            adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return record
