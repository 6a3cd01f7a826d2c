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
        def __init__(self, adapter, batch, skip_silent_prefix=True, known=None):
            super().__init__(adapter, batch, skip_silent_prefix=False, known=known)

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


MANY = EDITS + GUARDED_EDITS + [
    {"prompt": "The Eiffel Tower is located in", "target_new": "Rome", "subject": "Eiffel Tower"},
    {"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"},
    {"prompt": "Watts Humphrey attended", "target_new": "Paris", "subject": "Watts Humphrey"}]


@pytest.mark.parametrize("routing", ["gate", "key"])
def test_micro_batches_train_what_one_batch_trains(tokenizer, routing):
    """Groups of 2 edits, each backpropagated on its own and summed into one step, give the experts and gate
    that one group of all edits gives (up to float rounding), and each group holds at most 2 edits.

    The Switch balance loss is a statistic of the tokens a group holds, as in any micro-batched MoE training,
    so with the paper's gate it is left out here; key routing (the shipped recipe) has none."""
    from conftest import make_hparams, tiny_llama
    from memoe_plugin.training import trainer
    settings = dict(steps=12, early_stop=False, locality_guard=True, gate_noise=0.0, aux_loss_weight=0.0)
    if routing == "key":
        settings.update(scope_keys=True, scope_threshold=0.2, expert_routing="key", aux_loss_weight=0.1)
    trained, sizes = {}, {}
    original = trainer.build_edit_batches
    for micro in (0, 2):
        def spy(*args, **kwargs):
            batches = original(*args, **kwargs)
            sizes[micro] = [b.input_ids.shape[0] for b in batches]
            return batches
        trainer.build_edit_batches = spy
        try:
            torch.manual_seed(0)
            model = tiny_llama(len(tokenizer))
            apply_memoe_to_model(model, tokenizer, MANY, make_hparams(train_micro_batch=micro, **settings))
        finally:
            trainer.build_edit_batches = original
        bypass = get_adapter(model).bypass
        trained[micro] = (bypass.experts.detach().clone(), bypass.gate.weight.detach().clone())
        remove_memoe(model)
    assert len(sizes[0]) == 1 and max(sizes[2]) <= 2 and sum(sizes[2]) == len(MANY)
    for one, micro in zip(trained[0], trained[2]):
        assert one.abs().max() > 0
        assert torch.allclose(one, micro, atol=1e-5, rtol=1e-4)


def test_micro_batch_is_checked():
    from conftest import make_hparams
    with pytest.raises(ValueError, match="train_micro_batch"):
        make_hparams(train_micro_batch=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_on_cached_activations(tiny_model, tokenizer, dtype):
    """A bf16 or fp16 model takes the fast path: its logits match a full pass to the precision's tolerance (a share of
    what the bypass changes; the two paths round in another order), and the edits come out."""
    import memoe_plugin.training.fast_path as train
    model, hparams = tiny_model
    model = model.to(dtype)
    verdicts = []
    real = train.shortcut_agrees

    def spy(reference, shortcut, untouched, got_dtype):
        verdicts.append((real(reference, shortcut, untouched, got_dtype), got_dtype,
                         (reference - shortcut).abs().max().item(), (reference - untouched).abs().max().item()))
        return verdicts[-1][0]

    train.shortcut_agrees = spy
    try:
        apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=40, lr=1e-1))
    finally:
        train.shortcut_agrees = real
    adapter = get_adapter(model)
    assert adapter.last_report.used_cached_activations
    (agree, gap_text), got_dtype, gap, change = verdicts[0]
    assert agree and got_dtype == dtype
    assert gap <= train.HALF_PRECISION_SHARE * change                 # the shortcut is the full pass, rounded
    assert adapter.last_report.target_accuracy == 1.0
    remove_memoe(model)


def test_the_half_precision_check_still_refuses_a_shortcut_that_computes_another_function():
    """The tolerance is a share of the bypass's change: logits off by that change itself (a normed MLP output, as
    Gemma 3 has) fail in half precision as in float32."""
    from memoe_plugin.training.fast_path import shortcut_agrees
    untouched = torch.zeros(4, 10)
    reference = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 5
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert shortcut_agrees(reference, reference + 0.01 * reference.abs().max(), untouched, dtype)[0] == (
            dtype != torch.float32)                                    # rounding: fine in half precision only
        assert not shortcut_agrees(reference, reference * 0.2, untouched, dtype)[0]

