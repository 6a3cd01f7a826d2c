"""Training the experts and the gate on a batch of edit requests.

Loss = cross-entropy on the target tokens only + ``aux_loss_weight`` x the
Switch-Transformer balance loss. Requests are tokenised exactly as EasyEdit's
teacher-forced scoring does (``prompt + ' ' + target``, the target being the
tokens after the separately tokenised prompt), so what is trained is what is
scored.

The frozen model below the adapter never changes, so :class:`UpperStack`
computes it once per batch: the adapter's input, and the residual stream right
after the adapted layer without the bypass. Each step then runs only the bypass,
the layers above it and the LM head at the target positions. The shortcut is
checked against a full forward pass before training and dropped (with a
warning) if the two disagree.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compat import CacheNotFollowedError, cache_argument_name, output_cache
from .memory import remember_edits
from .model import MEMoEAdapter

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or Inf; the adapter was put back as it was before the call."""


@dataclass
class EditBatch:
    input_ids: torch.Tensor        # [batch, seq], right-padded
    attention_mask: torch.Tensor
    rows: torch.Tensor             # target token i sits at (rows[i], positions[i] + 1)
    positions: torch.Tensor        # position whose logits predict target token i
    targets: torch.Tensor          # the target token ids


@dataclass
class TrainReport:
    steps: int
    final_loss: float              # target cross-entropy at the last step (before its update)
    stopped_early: bool
    used_cached_activations: bool
    target_accuracy: float


def build_edit_batches(tokenizer, requests: list[dict], device, max_buckets: int = 3,
                       min_bucket: int = 8) -> list[EditBatch]:
    """Requests sorted by length into up to ``max_buckets`` batches, to pad (and compute) less."""
    lengths = [len(tokenizer(r["prompt"] + " " + r["target_new"])["input_ids"]) for r in requests]
    order = sorted(range(len(requests)), key=lengths.__getitem__)
    buckets = max(1, min(max_buckets, len(requests) // min_bucket))
    size = -(-len(requests) // buckets)
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return [build_edit_batch(tokenizer, [requests[i] for i in group], device) for group in groups]


def build_edit_batch(tokenizer, requests: list[dict], device) -> EditBatch:
    """Tokenise ``prompt + ' ' + target_new`` as EasyEdit's scoring does; right-pad."""
    sequences, rows, positions, targets = [], [], [], []
    for row, request in enumerate(requests):
        prompt, target = request["prompt"], request["target_new"]
        full = tokenizer(prompt + " " + target)["input_ids"]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        if len(full) <= prompt_len:
            raise ValueError(f"target_new {target!r} adds no tokens after prompt {prompt!r}")
        sequences.append(full)
        for pos in range(prompt_len, len(full)):
            rows.append(row)
            positions.append(pos - 1)
            targets.append(full[pos])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    return EditBatch(input_ids.to(device), attention_mask.to(device), as_long(rows), as_long(positions),
                     as_long(targets))


class UpperStack:
    """Runs the model from just after the adapted layer, reusing frozen activations."""

    def __init__(self, adapter: MEMoEAdapter, batch: EditBatch, skip_silent_prefix: bool = True):
        self.adapter, self.batch = adapter, batch
        model, hp = adapter.model, adapter.hparams
        layers_path = hp.module_template.split("{}")[0].rstrip(".")
        layers = model.get_submodule(layers_path)
        self.upper_layers = list(layers)[hp.layer + 1:]
        self.final_norm = _find_final_norm(model)
        self.head = model.get_output_embeddings()
        if self.final_norm is None or self.head is None:
            raise LookupError("no final norm / LM head found")
        self.features, self.mask, self.active = adapter.routing_features(batch.input_ids, batch.attention_mask)
        self.start, self.cache = 0, None
        start = self._silent_prefix_length() if skip_silent_prefix else 0
        if start > 0 and self.upper_layers:
            self._capture_after_prefix(start)
        else:
            self._capture()

    def _silent_prefix_length(self) -> int:
        """Positions where the locality guard keeps the bypass silent in every row, and no loss is taken.

        Their states never change in training, so the layers above the adapter can keep their keys and
        values in a KV cache and recompute only the positions after them.
        """
        if self.active is None:
            return 0
        real_and_active = self.active & self.mask.bool()
        any_active = real_and_active.any(dim=0)
        first_active = int(any_active.nonzero()[0]) if any_active.any() else self.active.shape[1]
        return min(first_active, int(self.batch.positions.min()))

    def _capture_after_prefix(self, start: int) -> None:
        """Fill a KV cache with the silent prefix, then capture the rest as it enters the upper layers."""
        batch, model = self.batch, self.adapter.model
        with self._capturing(self.upper_layers[0]):
            prefix = model(input_ids=batch.input_ids[:, :start], attention_mask=batch.attention_mask[:, :start],
                           use_cache=True)
            cache = output_cache(prefix)
            model(input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                  use_cache=True, **{cache_argument_name(model): cache})
        _truncate_cache(cache, start)
        self.start, self.cache = start, cache
        self.features = None if self.features is None else self.features[:, start:]
        self.mask = self.mask[:, start:]
        self.active = None if self.active is None else self.active[:, start:]

    def _capture(self) -> None:
        stage = self.upper_layers[0] if self.upper_layers else self.final_norm
        with self._capturing(stage):
            self.adapter.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                               use_cache=False)

    @contextlib.contextmanager
    def _capturing(self, stage: nn.Module):
        """Within: no grad, the bypass off, and the last adapter input and ``stage`` input are kept
        (``self.x``, ``self.hidden`` and the stage's other arguments ``self.args``/``self.kwargs``)."""
        captured = {}
        bypass = self.adapter.bypass

        def grab_input(module, args):
            captured["x"] = args[0].detach()

        def grab_stage(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["hidden"] = hidden.detach()
            captured["args"], captured["kwargs"] = args[1:], {k: v for k, v in kwargs.items()
                                                              if k != "hidden_states"}

        handles = [bypass.register_forward_pre_hook(grab_input),
                   stage.register_forward_pre_hook(grab_stage, with_kwargs=True)]
        enabled, bypass.enabled = getattr(bypass, "enabled", True), False
        try:
            with torch.no_grad():
                yield
        finally:
            bypass.enabled = enabled
            for handle in handles:
                handle.remove()
        self.x, self.hidden = captured["x"], captured["hidden"]
        self.args, self.kwargs = captured["args"], captured["kwargs"]

    def target_logits(self) -> torch.Tensor:
        bypass = self.adapter.bypass
        self.adapter.context.set(self.features, self.mask, self.active)
        try:
            hidden = self.hidden + bypass.delta(self.x).to(self.hidden.dtype)
        finally:
            self.adapter.context.clear()
        try:
            for layer in self.upper_layers:
                hidden = layer(hidden, *self.args, **self.kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        finally:
            if self.cache is not None:   # the layers appended this step's keys and values
                _truncate_cache(self.cache, self.start)
        picked = hidden[self.batch.rows, self.batch.positions - self.start]
        return self.head(self.final_norm(picked)).float()


def _truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions in every layer of a transformers ``Cache``.

    A negative argument to a cache layer's ``crop`` drops that many positions in every
    transformers 5 release (the meaning of a positive one changed)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise LookupError("this transformers cache has no per-layer crop")
    for layer in layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)
            # what is left is a slice of this step's concatenation: cut it from this step's graph
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        if layer.get_seq_length() > length:
            raise LookupError(f"could not truncate the KV cache to {length} positions")


def full_target_logits(adapter: MEMoEAdapter, batch: EditBatch) -> torch.Tensor:
    logits = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[batch.rows, batch.positions].float()


def _find_final_norm(model: nn.Module) -> Optional[nn.Module]:
    base = getattr(model, "base_model", None)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _logits_function(adapter: MEMoEAdapter, batch: EditBatch) -> tuple[Callable[[], torch.Tensor], bool]:
    """The fastest correct way to get target logits: the cached upper stack, else full passes."""
    full = lambda: full_target_logits(adapter, batch)
    try:
        stack = UpperStack(adapter, batch)
    except (LookupError, KeyError, IndexError, TypeError, CacheNotFollowedError) as err:
        warnings.warn(f"MEMoE: training with full forward passes ({err})")
        return full, False
    with torch.no_grad():
        reference, shortcut = full(), stack.target_logits()
    if stack.cache is not None and not torch.allclose(reference, shortcut, rtol=1e-3, atol=1e-3):
        stack = UpperStack(adapter, batch, skip_silent_prefix=False)   # the plain cached path, checked below
        with torch.no_grad():
            shortcut = stack.target_logits()
    if not torch.allclose(reference, shortcut, rtol=1e-3, atol=1e-3):
        gap = (reference - shortcut).abs().max().item()
        warnings.warn(f"MEMoE: cached activations disagree with the full model (max gap {gap:.2e}); "
                      "training with full forward passes instead")
        return full, False
    return stack.target_logits, True


def _bucketed_logits_function(adapter: MEMoEAdapter, batches: list[EditBatch]):
    """One function returning (target logits of all buckets, mean balance loss)."""
    functions = [_logits_function(adapter, batch) for batch in batches]
    bypass = adapter.bypass

    def logits_and_aux():
        pieces, aux = [], []
        for function, _ in functions:
            pieces.append(function())
            if bypass.aux_loss is not None:
                aux.append(bypass.aux_loss)
        return torch.cat(pieces), (torch.stack(aux).mean() if aux else None)

    return logits_and_aux, all(cached for _, cached in functions)


def train_experts(adapter: MEMoEAdapter, requests: list[dict], progress: bool = False) -> TrainReport:
    """Fit the experts and gate to ``requests``; on NaN/Inf restore them and raise."""
    hp, model, bypass = adapter.hparams, adapter.model, adapter.bypass
    device = bypass.experts.device
    batches = build_edit_batches(adapter.tokenizer, requests, device)
    targets = torch.cat([b.targets for b in batches])
    snapshot = [p.detach().clone() for p in bypass.trainable_parameters]
    was_training = model.training
    model.eval()   # dropout off: the frozen model computes exactly what it computes at test time
    # by name, not by object: accelerate replaces offloaded parameters on every forward
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in bypass.trainable_parameters:
        p.requires_grad_(True)
    if hp.gate_norm == "center" and not adapter.gate_calibrated:
        calibrate_gate(adapter, batches)
    optimizer = torch.optim.Adam([{"params": [bypass.experts]},
                                  {"params": [bypass.gate.weight], "lr": hp.lr * hp.gate_lr_scale}],
                                 lr=hp.lr, weight_decay=hp.weight_decay)
    steps_done, loss_value, stopped_early, accuracy = 0, math.nan, False, 0.0
    try:
        target_logits, cached = _bucketed_logits_function(adapter, batches)
        bar = _progress(hp.steps, progress)
        memory = adapter.memory if hp.memory_weight > 0 and adapter.memory is not None and len(adapter.memory) \
            else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            bypass.train()
            for step in range(hp.steps):
                logits, aux = target_logits()
                loss = target_loss = F.cross_entropy(logits, targets)
                if hp.aux_loss_weight and aux is not None:
                    loss = loss + hp.aux_loss_weight * aux
                if memory is not None:
                    loss = loss + hp.memory_weight * memory.loss(bypass, adapter.context, hp.memory_batch)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"MEMoE training diverged at step {step} (loss {loss.item()}); the edit was not kept. "
                        f"Lower lr (now {hp.lr}) or scale (now {hp.scale}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps_done, loss_value = step + 1, target_loss.item()
                accuracy = (logits.argmax(-1) == targets).float().mean().item()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{accuracy:.2f}")
                margin_ok = hp.early_stop_loss == 0 or target_loss.item() <= hp.early_stop_loss
                if hp.early_stop and accuracy == 1.0 and margin_ok:
                    stopped_early = step + 1 < hp.steps
                    break
        if bar is not None:
            bar.close()
        if not all(torch.isfinite(p).all() for p in bypass.trainable_parameters):
            raise TrainingDivergedError(f"MEMoE training left non-finite expert weights; the edit was not kept. "
                                        f"Lower lr (now {hp.lr}) or scale (now {hp.scale}).")
        bypass.eval()
        remember_edits(adapter, batches)
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(bypass.trainable_parameters, snapshot):
                p.copy_(saved)
        raise
    finally:
        bypass.eval()
        bypass.aux_loss = None
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        for p in bypass.trainable_parameters:
            p.requires_grad_(False)
        model.train(was_training)
    return TrainReport(steps_done, loss_value, stopped_early, cached, accuracy)


@torch.no_grad()
def calibrate_gate(adapter: MEMoEAdapter, batches: list[EditBatch]) -> None:
    """gate_norm: center. Mean and RMS of the layer input over the first edits' real tokens, and of
    the input-embedding rows (the space anchors live in), fixed from then on."""
    bypass, captured = adapter.bypass, []
    handle = bypass.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    enabled, bypass.enabled = bypass.enabled, False
    try:
        for batch in batches:
            adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        bypass.enabled = enabled
        handle.remove()
    x = torch.cat([h[b.attention_mask.bool()] for h, b in zip(captured, batches)]).float()
    x_mean = x.mean(0)
    x_rms = (x - x_mean).pow(2).mean().sqrt().item()
    feature_mean, feature_rms = None, 1.0
    if adapter.encoder.dim:
        rows = adapter.encoder.embedding.weight.detach().float()
        feature_mean = rows.mean(0)
        feature_rms = (rows - feature_mean).pow(2).mean().sqrt().item()
    bypass.set_gate_normalisation(x_mean, x_rms / adapter.hparams.gate_token_weight
                                  if adapter.hparams.gate_token_weight else math.inf, feature_mean, feature_rms)
    adapter.gate_calibrated = True


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="MEMoE training", unit="step", leave=False)
