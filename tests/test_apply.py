"""apply_memoe_to_model and restore on tiny random GPT-2 and Llama models."""
import pytest
import torch

from conftest import EDITS, assert_state_equal, state_copy
from memoe_plugin import MoEBypass, apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.adapter import MEMoEAdapter


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
    from memoe_plugin.training.trainer import TrainingDivergedError
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    real_sum = MoEBypass.expert_sum
    monkeypatch.setattr(MoEBypass, "expert_sum", lambda self, *a: real_sum(self, *a) * float("nan"))
    with pytest.raises(TrainingDivergedError, match="Lower lr"):
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=5))
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


def test_divergence_in_a_sequential_edit_keeps_earlier_edits(tokenizer, monkeypatch):
    from conftest import make_hparams, tiny_llama
    from memoe_plugin.training.trainer import TrainingDivergedError
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:2], make_hparams(steps=40))
    adapter = get_adapter(model)
    kept = [p.detach().clone() for p in adapter.bypass.trainable_parameters]
    real_sum = MoEBypass.expert_sum
    monkeypatch.setattr(MoEBypass, "expert_sum", lambda self, *a: real_sum(self, *a) * float("inf"))
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


def test_context_prefixes_add_entity_free_variants():
    from conftest import make_hparams
    from memoe_plugin.routing.extractors import OfflineExtractor
    from memoe_plugin.hparams import CONTEXT_PREFIXES
    from memoe_plugin.apply import training_variants
    batch = training_variants(EDITS, make_hparams(context_prefixes=2))
    assert len(batch) == 3 * len(EDITS) and batch[:3] == EDITS
    assert batch[3]["prompt"] == f"{CONTEXT_PREFIXES[0]} {EDITS[0]['prompt']}"
    assert all(b["target_new"] == e["target_new"] for b, e in zip(batch[3:6], EDITS))
    for prefix in CONTEXT_PREFIXES:   # the prefixes bring no knowledge anchor of their own
        assert OfflineExtractor()(prefix + " x") == []
    assert training_variants(EDITS, make_hparams()) == EDITS


def test_bank_rewordings_add_the_relations_other_labels_as_variants_of_their_edit():
    from conftest import make_hparams
    from memoe_plugin.apply import training_variants
    requests = [dict(e, _edit=i) for i, e in enumerate(EDITS)]
    batch = training_variants(requests, make_hparams(bank_rewordings=True))
    assert batch[:len(EDITS)] == requests
    variants = {(b["_edit"], b["prompt"], b["target_new"]) for b in batch[len(EDITS):]}
    danielle, japan = (next(i for i, e in enumerate(EDITS) if e["subject"] == s) for s in ("Danielle Darrieux", "Japan"))
    assert variants == {   # 'mother tongue' is a label of 'native language' (the longest label wins over 'mother')
        (danielle, "The native language of Danielle Darrieux is", EDITS[danielle]["target_new"]),
        (danielle, "The first language of Danielle Darrieux is", EDITS[danielle]["target_new"]),
        (japan, "The capital city of Japan is", EDITS[japan]["target_new"]),
        (japan, "The seat of government of Japan is", EDITS[japan]["target_new"])}


def test_a_later_call_uses_its_own_settings_or_refuses_the_ones_it_cannot_honour(tokenizer):
    """Scale, gate noise and the key scope's thresholds are taken from every call; a snap needs the keys' inputs,
    which a scope built without it never kept: refused, with nothing changed."""
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer))
    settings = dict(locality_guard=True, scope_keys=True, scope_threshold=0.3, steps=5)
    apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(**settings))
    adapter = get_adapter(model)
    later = make_hparams(**{**settings, "scope_threshold": 0.6, "scale": 0.5, "gate_noise": 0.1})
    apply_memoe_to_model(model, tokenizer, EDITS[1:2], later)
    assert (adapter.scope.threshold, adapter.bypass.scale, adapter.bypass.gate_noise) == (0.6, 0.5, 0.1)
    keys = len(adapter.scope)
    with pytest.raises(ValueError, match="scope_snap.*kept no layer inputs.*restore"):
        apply_memoe_to_model(model, tokenizer, EDITS[2:], make_hparams(**{**settings, "scope_snap": 1.0}))
    assert len(adapter.scope) == keys and adapter.scope.snap == 0 and len(adapter.edits) == 2
    remove_memoe(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_edits_generates_and_restores_exactly(tokenizer, dtype):
    """The base model in bf16/fp16 (a bf16 load, or EasyEdit's fp16: true); the experts and gate stay float32,
    the bypass output is cast to the projection's dtype, and restore gives the half-precision weights back."""
    from conftest import make_hparams, tiny_llama
    model = tiny_llama(len(tokenizer)).to(dtype)
    saved = state_copy(model)
    inputs = tokenizer(EDITS[1]["prompt"], return_tensors="pt")
    before = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    hp = make_hparams(steps=60, locality_guard=True, scope_keys=True, scope_threshold=0.2, scope_snap=1.0,
                      expert_routing="key", scope_anti_keys="relation_bank", fp16=dtype == torch.float16)
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, hp)
    adapter = get_adapter(model)
    assert adapter.bypass.experts.dtype == torch.float32 and adapter.bypass.base.weight.dtype == dtype
    assert adapter.last_report.target_accuracy == 1.0
    after = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    wanted = tokenizer(EDITS[1]["prompt"] + " " + EDITS[1]["target_new"])["input_ids"][inputs["input_ids"].shape[1]]
    assert after[0, inputs["input_ids"].shape[1]].item() == wanted
    restore()
    assert_state_equal(model, saved)
    again = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(again, before)
