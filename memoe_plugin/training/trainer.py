"""Training the experts and the gate on a batch of edit requests.

Loss = cross-entropy on the target tokens only + ``aux_loss_weight`` x the Switch
load-balancing loss (+ the output memory's penalty when it is on). The model stays in
eval mode (dropout off) and only the experts and the gate get gradients. On NaN or Inf
the experts and the gate are put back as they were before the call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .batches import build_edit_batches
from .calibration import calibrate_gate
from .capture import capture_bypass
from .fast_path import bucket_logits_functions, full_target_logits, target_logits_function
from .memory import remember_edits
from .preservation import Preservation
from .scope_keys import register_keys
from .values import close_keys


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or Inf; the adapter was put back as it was before the call."""


@dataclass
class TrainReport:
    steps: int
    final_loss: float              # target cross-entropy at the last step (before its update)
    stopped_early: bool
    used_cached_activations: bool
    target_accuracy: float
    rewordings: int = 0            # prompts the model reworded for this call's edits (``rewordings``)
    aliases: int = 0               # other subject names the model gave that open the guard (``aliases``)


def train_experts(adapter, requests: list[dict], progress: bool = False,
                  subjects_of: Optional[list[dict]] = None) -> TrainReport:
    """Fit the experts and gate to ``requests``; on NaN/Inf restore them and raise.

    ``subjects_of``: the requests whose subjects get preservation prompts (``preserve_prompts``);
    default ``requests``.
    """
    hp, model, bypass = adapter.hparams, adapter.model, adapter.bypass
    device = bypass.experts.device
    batches = build_edit_batches(adapter.tokenizer, requests, device, micro_batch=hp.train_micro_batch)
    learning_ids = adapter.trainable_experts    # None: every expert learns in this call
    learning = torch.arange(bypass.experts.shape[0], device=device) if learning_ids is None else \
        torch.tensor(learning_ids, dtype=torch.long, device=device)
    snapshot = (bypass.experts.detach()[learning], bypass.gate.weight.detach().clone())   # indexing copies
    was_training = model.training
    model.eval()   # dropout off: the frozen model computes exactly what it computes at test time
    # by name, not by object: accelerate replaces offloaded parameters on every forward
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if hp.gate_norm == "center" and not adapter.gate_calibrated:
        calibrate_gate(adapter, batches)
    scope = adapter.scope
    keys_before = None if scope is None else scope.sizes()
    try:
        known = register_keys(adapter, batches, requests, len(adapter.edits), progress) if scope is not None else None
        with bypass.learning_only(learning_ids) as experts:   # earlier experts: no gradient, no Adam state
            report = _fit(adapter, batches, experts, subjects_of or requests, progress, known)
            if not all(torch.isfinite(p).all() for p in (experts, bypass.gate.weight)):
                raise TrainingDivergedError(f"MEMoE training left non-finite expert weights; the edit was not "
                                            f"kept. Lower lr (now {hp.lr}) or scale (now {hp.scale}).")
        bypass.eval()
        remember_edits(adapter, batches)
        if hp.scope_values:
            close_keys(adapter)
    except BaseException:
        with torch.no_grad():
            bypass.experts[learning] = snapshot[0]
            bypass.gate.weight.copy_(snapshot[1])
        if scope is not None:
            scope.truncate(keys_before)
        raise
    finally:
        bypass.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        for p in bypass.trainable_parameters:
            p.requires_grad_(False)
        model.train(was_training)
    return report


def _fit(adapter, batches, experts: torch.nn.Parameter, subjects_of: list[dict], progress: bool,
         known: Optional[list] = None) -> TrainReport:
    """The optimisation loop of :func:`train_experts` on ``experts`` (the learning ones) and the gate."""
    hp, bypass = adapter.hparams, adapter.bypass
    targets = torch.cat([b.targets for b in batches])
    for p in (experts, bypass.gate.weight):
        p.requires_grad_(True)
    lr = learning_rate(hp, experts.shape[1])
    optimizer = torch.optim.Adam([{"params": [experts]},
                                  {"params": [bypass.gate.weight], "lr": lr * hp.gate_lr_scale}],
                                 lr=lr, weight_decay=hp.weight_decay)
    buckets, cached = bucket_logits_functions(adapter, batches, known)
    if known is not None:   # the stacks keep what they need of the captures: let the rest go before training
        known.clear()
    preservation, preserved_logits = None, None
    if hp.preserve_prompts and hp.preserve_weight > 0:
        preservation = Preservation(adapter, subjects_of, hp.preserve_prompts, hp.seed)
        if len(preservation):
            with capture_bypass(adapter, enabled=False):
                preservation.set_reference(torch.cat([full_target_logits(adapter, b)
                                                      for b in preservation.batches]))
            preserved_logits, _ = target_logits_function(adapter, preservation.batches)
    memory = adapter.memory if hp.memory_weight > 0 and adapter.memory is not None and len(adapter.memory) \
        else None
    memory_routes = None   # with frozen experts: only the rows of the experts that learn in this call
    if memory is not None and adapter.trainable_experts is not None and bypass.router is not None:
        memory_routes = memory.routes_on(bypass, adapter.trainable_experts)
        memory = memory if len(memory_routes.rows) else None
    steps_done, loss_value, stopped_early, accuracy = 0, math.nan, False, 0.0
    bar = _progress(hp.steps, progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        bypass.train()
        for step in range(hp.steps):
            # One bucket's graph at a time (train_micro_batch): each bucket's share of the loss is backpropagated
            # before the next runs, and the summed gradients make the step one batch would make.
            optimizer.zero_grad(set_to_none=True)
            target_loss, predicted = 0.0, []
            for (bucket, batch) in zip(buckets, batches):
                logits, aux = bucket()
                loss = F.cross_entropy(logits, batch.targets, reduction="sum") / len(targets)
                target_loss += loss.item()
                if hp.aux_loss_weight and aux is not None:
                    loss = loss + hp.aux_loss_weight * aux / len(buckets)
                _backward(loss, step, hp)
                predicted.append(logits.detach().argmax(-1))
            extra = None
            if memory is not None:
                extra = hp.memory_weight * memory.loss(bypass, hp.memory_batch, memory_routes)
            if preserved_logits is not None:
                kept = hp.preserve_weight * preservation.loss(preserved_logits()[0])
                extra = kept if extra is None else extra + kept
            if extra is not None:
                _backward(extra, step, hp)
            optimizer.step()
            steps_done, loss_value = step + 1, target_loss
            accuracy = (torch.cat(predicted) == targets).float().mean().item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy:.2f}")
            margin_ok = hp.early_stop_loss == 0 or target_loss <= hp.early_stop_loss
            if hp.early_stop and accuracy == 1.0 and margin_ok:
                stopped_early = step + 1 < hp.steps
                break
    if bar is not None:
        bar.close()
    return TrainReport(steps_done, loss_value, stopped_early, cached, accuracy)


def learning_rate(hp, in_features: int) -> float:
    """``lr``, or with ``lr_width`` N the rate that moves an ``in_features``-wide expert's output as ``lr`` moves an
    N-wide one's."""
    return hp.lr * hp.lr_width / in_features if hp.lr_width else hp.lr


def _backward(loss: torch.Tensor, step: int, hp) -> None:
    if not torch.isfinite(loss):
        raise TrainingDivergedError(
            f"MEMoE training diverged at step {step} (loss {loss.item()}); the edit was not kept. "
            f"Lower lr (now {hp.lr}) or scale (now {hp.scale}).")
    loss.backward()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="MEMoE training", unit="step", leave=False)
