"""Training: batches scored as EasyEdit scores them, the fast path against full passes, early stop."""
import pytest
import torch

from conftest import EDITS
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.training.batches import build_edit_batch, build_edit_batches


GUARDED_EDITS = [
    {"prompt": "As the records show, the mother tongue of Danielle Darrieux is", "target_new": "Welsh",
     "subject": "Danielle Darrieux"},
    {"prompt": "In the atlas of the world, the capital of Japan is", "target_new": "Warsaw", "subject": "Japan"},
]


def test_edit_batch_matches_easyedit_scoring(tokenizer):
    request = EDITS[0]
    batch = build_edit_batch(tokenizer, [request, EDITS[1]], "cpu")
    full = tokenizer(request["prompt"] + " " + request["target_new"])["input_ids"]
    prompt_len = len(tokenizer(request["prompt"])["input_ids"])
    mine = batch.rows == 0
    assert batch.targets[mine].tolist() == full[prompt_len:]
    assert batch.positions[mine].tolist() == list(range(prompt_len - 1, len(full) - 1))
    assert batch.attention_mask[0, :len(full)].all() and batch.input_ids.shape[0] == 2


def test_cached_activation_training_matches_full_passes(tiny_model, tokenizer):
    """The fast path must train exactly what full forward passes would train."""
    import memoe_plugin.training.fast_path as train
    model, hparams = tiny_model
    apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=15))
    fast = get_adapter(model)
    assert fast.last_report.used_cached_activations
    fast_experts = fast.bypass.experts.detach().clone()
    remove_memoe(model)

    original = train.UpperStack
    train.UpperStack = None   # calling it raises TypeError -> full passes
    try:
        with pytest.warns(UserWarning, match="full forward passes"):
            apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=15))
    finally:
        train.UpperStack = original
    slow = get_adapter(model)
    assert not slow.last_report.used_cached_activations
    assert torch.allclose(slow.bypass.experts, fast_experts, atol=1e-4)
    remove_memoe(model)


def test_silent_prefix_is_skipped_in_training_and_trains_the_same(tiny_model, tokenizer):
    """With the locality guard, positions before every row's anchor come from a KV cache; same result."""
    import memoe_plugin.training.fast_path as train
    model, hparams = tiny_model
    hp = hparams(steps=12, locality_guard=True)
    starts = []
    original = train.UpperStack

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            starts.append(self.start)

    train.UpperStack = Recording
    try:
        apply_memoe_to_model(model, tokenizer, GUARDED_EDITS, hp)
    finally:
        train.UpperStack = original
    assert max(starts) > 0                      # the prefix really was skipped
    fast = get_adapter(model)
    assert fast.last_report.used_cached_activations
    fast_experts = fast.bypass.experts.detach().clone()
    remove_memoe(model)

    class NoSkip(original):
        def __init__(self, adapter, batch, skip_silent_prefix=True):
            super().__init__(adapter, batch, skip_silent_prefix=False)

    train.UpperStack = NoSkip
    try:
        apply_memoe_to_model(model, tokenizer, GUARDED_EDITS, hp)
    finally:
        train.UpperStack = original
    gap = (get_adapter(model).bypass.experts - fast_experts).abs().max().item()
    assert gap < 1e-3
    remove_memoe(model)


def test_truncate_cache_keeps_the_prefix_in_every_layer():
    from transformers import DynamicCache
    from memoe_plugin.training.fast_path import truncate_cache as _truncate_cache
    cache = DynamicCache()
    for layer in range(3):
        cache.update(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), layer)
    keys = cache.layers[2].keys.clone()
    _truncate_cache(cache, 3)
    assert [cache.layers[i].get_seq_length() for i in range(3)] == [3, 3, 3]
    assert torch.equal(cache.layers[2].keys, keys[..., :3, :])


def test_length_buckets_cover_every_target_once(tokenizer):
    from conftest import EDITS
    requests = [dict(EDITS[i % 3], prompt=EDITS[i % 3]["prompt"] + " x" * (i % 7)) for i in range(20)]
    batches = build_edit_batches(tokenizer, requests, "cpu", max_buckets=3, min_bucket=5)
    assert len(batches) == 3
    single = build_edit_batch(tokenizer, requests, "cpu")
    assert sorted(torch.cat([b.targets for b in batches]).tolist()) == sorted(single.targets.tolist())
    assert sum(b.input_ids.numel() for b in batches) < single.input_ids.numel()
    assert build_edit_batches(tokenizer, requests[:7], "cpu", min_bucket=8)[0].input_ids.shape[0] == 7


def test_early_stop_waits_for_the_loss_margin(tokenizer):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=200, early_stop=True))
    first = get_adapter(model).last_report
    remove_memoe(model)
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=200, early_stop=True, early_stop_loss=5.43))
    margin = get_adapter(model).last_report
    remove_memoe(model)
    assert first.stopped_early and margin.stopped_early
    assert margin.steps > first.steps and margin.final_loss <= 5.43 + 1e-2
