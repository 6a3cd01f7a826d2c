"""The bypass layer, the injector and apply/restore on tiny random GPT-2 and Llama models."""
import pytest
import torch

from conftest import EDITS, assert_state_equal, state_copy
from memoe_plugin import MoEBypass, apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.model import MEMoEAdapter
from memoe_plugin.layer import RoutingContext
from memoe_plugin.train import build_edit_batch, build_edit_batches


def logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def answer_tokens(model, tokenizer, request):
    """Greedy teacher-forced prediction of the target tokens, as EasyEdit scores them."""
    full = tokenizer(request["prompt"] + " " + request["target_new"], return_tensors="pt")
    prompt_len = len(tokenizer(request["prompt"])["input_ids"])
    with torch.no_grad():
        predicted = model(**full).logits[0].argmax(-1)
    return predicted[prompt_len - 1:-1].tolist(), full["input_ids"][0, prompt_len:].tolist()


def test_untrained_adapter_changes_nothing(tiny_model, tokenizer):
    model, hparams = tiny_model
    texts = ["The capital of Japan is Tokyo", "Who is the father of Marie Curie?"]
    before = logits(model, tokenizer, texts)
    adapter = MEMoEAdapter.attach(model, tokenizer, hparams())
    try:
        assert torch.equal(logits(model, tokenizer, texts), before)
    finally:
        adapter.detach()


def test_edit_takes_and_restore_is_bit_exact(tiny_model, tokenizer):
    model, hparams = tiny_model
    saved = state_copy(model)
    grad_flags = [p.requires_grad for p in model.parameters()]
    edited, restore = apply_memoe_to_model(model, tokenizer, EDITS, hparams())
    assert edited is model
    for request in EDITS:
        predicted, wanted = answer_tokens(model, tokenizer, request)
        assert predicted == wanted, request
    restore()
    assert get_adapter(model) is None
    assert_state_equal(model, saved)
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    assert not any(isinstance(m, MoEBypass) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "generate" not in model.__dict__


def test_base_weights_frozen_during_training(tiny_model, tokenizer):
    model, hparams = tiny_model
    saved = state_copy(model)
    apply_memoe_to_model(model, tokenizer, EDITS, hparams())
    bypass = get_adapter(model).bypass
    for name, value in model.state_dict().items():
        if any(part in name for part in (".experts", ".gate.", ".gate_shift", ".gate_scale")):
            continue
        original = name.replace(".base.", ".")
        assert torch.equal(value, saved[original]), name
    assert bypass.experts.abs().sum() > 0
    remove_memoe(model)


def test_sequential_edits_accumulate_in_the_same_experts(tokenizer):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    hp = make_hparams(steps=60)
    _, restore_first = apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    first = get_adapter(model)
    _, restore_second = apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)
    assert get_adapter(model) is first and len(first.edits) == 3
    predicted, wanted = answer_tokens(model, tokenizer, EDITS[2])
    assert predicted == wanted
    restore_second()
    assert_state_equal(model, saved)
    restore_first()   # a second restore is harmless
    assert_state_equal(model, saved)


def test_copy_leaves_the_original_alone(tokenizer):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    edited, restore = apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(), copy=True)
    assert edited is not model and get_adapter(model) is None and get_adapter(edited) is not None
    assert_state_equal(model, saved)


def test_only_selected_experts_are_computed(tokenizer):
    context = RoutingContext(0)
    base = torch.nn.Linear(8, 6)
    layer = MoEBypass(base, context, num_experts=4, top_k=1, scale=1.0, gate_noise=0.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        routing_logits = layer.gate(x)
    chosen = routing_logits.argmax(-1)
    out = layer(x)
    probs = routing_logits.softmax(-1)
    expected = base(x) + torch.stack([
        probs[b, t, chosen[b, t]] * (x[b, t] @ layer.experts[chosen[b, t]])
        for b in range(2) for t in range(5)]).reshape(2, 5, 6)
    assert torch.allclose(out, expected, atol=1e-5)
    # each token went to exactly one expert
    assert layer.last_routing.shape == (2, 5, 1)


def test_top2_weights_and_balance_loss():
    context = RoutingContext(0)
    layer = MoEBypass(torch.nn.Linear(8, 6), context, num_experts=4, top_k=2, scale=0.5, gate_noise=0.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(3, 4, 8)
    probs = layer.gate(x).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    expected = sum(weights[..., k, None] * torch.einsum("bti,btio->bto", x, layer.experts[chosen[..., k]])
                   for k in range(2))
    assert torch.allclose(layer.delta(x), 0.5 * expected, atol=1e-5)
    layer.train()
    layer.delta(x)
    # Switch loss: E * sum_e f_e P_e; equals 1 exactly when routing is uniform, >= 1/E always
    fraction = torch.nn.functional.one_hot(chosen[..., 0].reshape(-1), 4).float().mean(0)
    assert torch.allclose(layer.aux_loss, 4 * (fraction * probs.reshape(-1, 4).mean(0)).sum())


def test_gate_noise_only_while_training():
    context = RoutingContext(0)
    layer = MoEBypass(torch.nn.Linear(8, 6), context, num_experts=4, top_k=1, scale=1.0, gate_noise=5.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(4, 8, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer.delta(x)
    assert not torch.equal(first, layer.delta(x))


def test_edit_batch_matches_easyedit_scoring(tokenizer):
    request = EDITS[0]
    batch = build_edit_batch(tokenizer, [request, EDITS[1]], "cpu")
    full = tokenizer(request["prompt"] + " " + request["target_new"])["input_ids"]
    prompt_len = len(tokenizer(request["prompt"])["input_ids"])
    mine = batch.rows == 0
    assert batch.targets[mine].tolist() == full[prompt_len:]
    assert batch.positions[mine].tolist() == list(range(prompt_len - 1, len(full) - 1))
    assert batch.attention_mask[0, :len(full)].all() and batch.input_ids.shape[0] == 2


@pytest.mark.parametrize("requests, words", [
    ([], "no edit requests"),
    ([{"prompt": "x"}], "target_new"),
    ([{"prompt": "The capital of Japan is", "target_new": "   "}], "empty or whitespace"),
    ([{"prompt": 3, "target_new": "Paris"}], "'prompt' must be a string"),
    (["The capital of Japan is"], "expected a dict"),
])
def test_bad_requests(tokenizer, requests, words):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    with pytest.raises(ValueError, match=words):
        apply_memoe_to_model(model, tokenizer, requests, make_hparams())
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


@pytest.mark.parametrize("overrides, error, words", [
    ({"layer": 9}, ValueError, "out of range.*0..3"),
    ({"module_template": "model.layers.{}.mlp.nothing"}, ValueError, "not a module"),
    ({"module_template": "model.layers.{}.mlp.act_fn"}, TypeError, "Linear"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "meta"}, ValueError, "device"),
])
def test_bad_targets_leave_model_untouched(tokenizer, overrides, error, words):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    with pytest.raises(error, match=words):
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(**overrides))
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


def test_divergence_is_reported_and_nothing_is_kept(tokenizer, monkeypatch):
    from conftest import make_hparams, tiny_llama
    from memoe_plugin.train import TrainingDivergedError
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    real_delta = MoEBypass.delta
    monkeypatch.setattr(MoEBypass, "delta", lambda self, x: real_delta(self, x) * float("nan"))
    with pytest.raises(TrainingDivergedError, match="Lower lr"):
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=5))
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


def test_divergence_in_a_sequential_edit_keeps_earlier_edits(tokenizer, monkeypatch):
    from conftest import make_hparams, tiny_llama
    from memoe_plugin.train import TrainingDivergedError
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:2], make_hparams(steps=40))
    adapter = get_adapter(model)
    kept = [p.detach().clone() for p in adapter.bypass.trainable_parameters]
    real_delta = MoEBypass.delta
    monkeypatch.setattr(MoEBypass, "delta", lambda self, x: real_delta(self, x) * float("inf"))
    with pytest.raises(TrainingDivergedError):
        apply_memoe_to_model(model, tokenizer, EDITS[2:], make_hparams(steps=5))
    monkeypatch.undo()
    assert get_adapter(model) is adapter and len(adapter.edits) == 2
    assert all(torch.equal(p, k) for p, k in zip(adapter.bypass.trainable_parameters, kept))
    predicted, wanted = answer_tokens(model, tokenizer, EDITS[0])
    assert predicted == wanted
    remove_memoe(model)


def test_structural_change_between_sequential_edits_is_refused(tokenizer):
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(steps=2))
    with pytest.raises(ValueError, match="num_experts"):
        apply_memoe_to_model(model, tokenizer, EDITS[1:], make_hparams(steps=2, num_experts=2))
    remove_memoe(model)


def test_cached_activation_training_matches_full_passes(tiny_model, tokenizer):
    """The fast path must train exactly what full forward passes would train."""
    import memoe_plugin.train as train
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


GUARDED_EDITS = [
    {"prompt": "As the records show, the mother tongue of Danielle Darrieux is", "target_new": "Welsh",
     "subject": "Danielle Darrieux"},
    {"prompt": "In the atlas of the world, the capital of Japan is", "target_new": "Warsaw", "subject": "Japan"},
]


def test_silent_prefix_is_skipped_in_training_and_trains_the_same(tiny_model, tokenizer):
    """With the locality guard, positions before every row's anchor come from a KV cache; same result."""
    import memoe_plugin.train as train
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
    from memoe_plugin.train import _truncate_cache
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


def test_context_prefixes_add_entity_free_variants():
    from conftest import make_hparams
    from memoe_plugin.extractors import OfflineExtractor
    from memoe_plugin.hparams import CONTEXT_PREFIXES
    from memoe_plugin.main import with_context_prefixes
    batch = with_context_prefixes(EDITS, make_hparams(context_prefixes=2))
    assert len(batch) == 3 * len(EDITS) and batch[:3] == EDITS
    assert batch[3]["prompt"] == f"{CONTEXT_PREFIXES[0]} {EDITS[0]['prompt']}"
    assert all(b["target_new"] == e["target_new"] for b, e in zip(batch[3:6], EDITS))
    for prefix in CONTEXT_PREFIXES:   # the prefixes bring no knowledge anchor of their own
        assert OfflineExtractor()(prefix + " x") == []
    assert with_context_prefixes(EDITS, make_hparams()) == EDITS


def test_detach_and_reattach_toggle_the_edits_exactly(tiny_model, tokenizer):
    model, hparams = tiny_model
    saved = state_copy(model)
    apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=10))
    adapter = get_adapter(model)
    ids = tokenizer(EDITS[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        edited, = [model(input_ids=ids).logits]
        adapter.detach()
        assert get_adapter(model) is None
        assert_state_equal(model, saved)
        base = model(input_ids=ids).logits
        adapter.reattach()
        again = model(input_ids=ids).logits
    assert not torch.equal(base, edited) and torch.equal(again, edited)
    with pytest.raises(RuntimeError, match="already has"):
        adapter.reattach()
    remove_memoe(model)
    assert_state_equal(model, saved)
