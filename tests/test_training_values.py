"""``scope_values``: each closed key keeps the output its expert gave it, and the experts are emptied.

The values must give what the experts gave (to the storage's rounding), over several sequential calls and through
save and load; a later call must leave an earlier edit's outputs as they were; and nothing kept may grow with the
projection's in x out.
"""
import pytest
import torch

from conftest import EDITS, GPT2_TEMPLATE, interrupted_and_straight, make_hparams, tiny_gpt2, tiny_llama
from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.persist import read_adapter_metadata
import memoe_plugin.training.trainer as trainer

MORE = [{"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"},
        {"prompt": "Watts Humphrey attended", "target_new": "Paris", "subject": "Watts Humphrey"},
        {"prompt": "Apple A5 is developed by", "target_new": "Stanford University", "subject": "Apple A5"}]
CALLS = [EDITS[:2], EDITS[2:] + MORE[:1], MORE[1:]]
VALUES = dict(steps=60, locality_guard=True, scope_keys=True, scope_threshold=0.3, scope_snap=1.0,
              expert_routing="key", scope_values=True, num_experts=2, scope_stop_keys=True)


def hparams(arch: str, **overrides):
    settings = dict(VALUES, **overrides)
    if arch == "gpt2":
        return make_hparams(GPT2_TEMPLATE, model_name="tiny-gpt2", **settings)
    return make_hparams(**settings)


def model_for(arch: str, tokenizer):
    return tiny_gpt2(len(tokenizer)) if arch == "gpt2" else tiny_llama(len(tokenizer))


def probe(tokenizer):
    texts = [e["prompt"] + " " + e["target_new"] for e in EDITS + MORE] + ["Toko Yasuda was born in Warsaw"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_closed_keys_give_what_their_experts_gave_over_sequential_calls(arch, storage, tokenizer, monkeypatch):
    """At every call's end, the model with the call's keys closed gives the logits it gave with the trained experts
    (up to the storage's rounding of the values), and the experts are emptied."""
    model, hp = model_for(arch, tokenizer), hparams(arch, scope_storage=storage)
    inputs, gaps, real = probe(tokenizer), [], trainer.close_keys

    def close_and_compare(adapter):
        before = logits(adapter.model, inputs)
        assert adapter.bypass.experts.shape[0] == hp.num_experts and adapter.scope.closed < len(adapter.scope)
        real(adapter)
        gaps.append(((logits(adapter.model, inputs) - before).abs().max() / before.abs().max()).item())

    monkeypatch.setattr(trainer, "close_keys", close_and_compare)
    for call in CALLS:
        apply_memoe_to_model(model, tokenizer, call, hp)
        adapter = get_adapter(model)
        assert adapter.bypass.experts.shape[0] == 0                    # no expert outlives its call
        assert adapter.scope.closed == len(adapter.scope) and adapter.scope.inputs.shape[0] == 0
    assert len(gaps) == len(CALLS)
    assert max(gaps) < (2e-3 if storage == "float16" else 2e-2), gaps
    assert max(gaps) > 0 or storage == "float16"   # int8 values are rounded: the check can see a difference
    remove_memoe(model)


def test_a_later_call_leaves_every_earlier_edit_exactly_as_it_was(tokenizer):
    model, hp = tiny_llama(len(tokenizer)), hparams("llama")
    earlier = tokenizer([e["prompt"] + " " + e["target_new"] for e in CALLS[0]], return_tensors="pt", padding=True)
    apply_memoe_to_model(model, tokenizer, CALLS[0], hp)
    first = logits(model, earlier)
    for call in CALLS[1:]:
        apply_memoe_to_model(model, tokenizer, call, hp)
        assert torch.equal(logits(model, earlier), first)
    remove_memoe(model)


def test_without_values_a_later_call_moves_earlier_edits(tokenizer):
    """The check above can fail: with shared experts that keep learning, the same calls move the first edits."""
    model, hp = tiny_llama(len(tokenizer)), hparams("llama", scope_values=False)
    earlier = tokenizer([e["prompt"] + " " + e["target_new"] for e in CALLS[0]], return_tensors="pt", padding=True)
    apply_memoe_to_model(model, tokenizer, CALLS[0], hp)
    first = logits(model, earlier)
    for call in CALLS[1:]:
        apply_memoe_to_model(model, tokenizer, call, hp)
    assert not torch.equal(logits(model, earlier), first)
    remove_memoe(model)


def test_a_saved_adapter_with_values_keeps_editing_exactly_as_if_never_saved(tokenizer, tmp_path):
    hp = hparams("llama", scope_storage="int8")
    straight, resumed, path = interrupted_and_straight(tokenizer, hp, CALLS, tmp_path / "checkpoint.safetensors")
    assert "scope.values" in read_adapter_metadata(path)["tensors"]
    assert torch.equal(logits(straight, probe(tokenizer)), logits(resumed, probe(tokenizer)))
    remove_memoe(straight)
    remove_memoe(resumed)


def test_what_is_kept_per_key_is_a_key_and_an_output_row(tokenizer):
    """No tensor the adapter keeps has the projection's in x out shape: per key, one key row (the input's width) and
    one value row (the output's width), besides ids, scales and the gate's fixed statistics."""
    model, hp = tiny_llama(len(tokenizer)), hparams("llama", scope_storage="int8")
    for call in CALLS:
        apply_memoe_to_model(model, tokenizer, call, hp)
    adapter = get_adapter(model)
    tensors, _ = adapter.state()
    in_features, out_features = adapter.bypass.base.in_features, adapter.bypass.base.out_features
    assert tensors["experts"].numel() == 0 and tensors["gate.weight"].numel() == 0
    assert tensors["scope.values"].shape == (len(adapter.scope), out_features)
    assert tensors["scope.values"].dtype == torch.int8
    assert not any(t.numel() and t.numel() % (in_features * out_features) == 0 and t.dim() >= 2
                   for t in tensors.values())
    remove_memoe(model)


@pytest.mark.parametrize("bad, message", [
    (dict(scope_snap=0.5), "scope_values"),
    (dict(expert_routing="gate"), "scope_values"),
    (dict(edits_per_expert=10), "edits_per_expert"),
    (dict(memory_rows=100), "memory_rows"),
    (dict(replay=2), "replay"),
])
def test_values_need_a_fixed_row_per_key_and_refuse_what_they_replace(bad, message):
    with pytest.raises(ValueError, match=message):
        MEMoEHyperParams.from_dict(dict(alg_name="MEMoE", model_name="m", layer=2,
                                        module_template="model.layers.{}.mlp.down_proj", **dict(VALUES, **bad)))


def test_a_call_closed_in_groups_is_the_same_as_sequential_calls_of_that_size(tokenizer):
    edits = EDITS + MORE
    grouped, separate = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    apply_memoe_to_model(grouped, tokenizer, edits, hparams("llama", close_every=2))
    for lo in range(0, len(edits), 2):
        apply_memoe_to_model(separate, tokenizer, edits[lo:lo + 2], hparams("llama"))
    tensors_a, info_a = get_adapter(grouped).state()
    tensors_b, info_b = get_adapter(separate).state()
    assert info_a["edits"] == info_b["edits"] and set(tensors_a) == set(tensors_b)
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    remove_memoe(grouped)
    remove_memoe(separate)


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "after-an-earlier-call"])
def test_a_group_that_fails_takes_the_calls_earlier_groups_back(tokenizer, monkeypatch, earlier):
    from memoe_plugin.training.trainer import TrainingDivergedError
    from memoe_plugin.layer import MoEBypass
    model, hp = tiny_llama(len(tokenizer)), hparams("llama", close_every=2)
    inputs = probe(tokenizer)
    if earlier:
        apply_memoe_to_model(model, tokenizer, MORE[:1], hp)
    before = logits(model, inputs)
    real, calls = MoEBypass.expert_sum, []

    def fails_in_the_second_group(self, *args):
        calls.append(get_adapter(model).scope.closed)
        out = real(self, *args)
        return out * float("nan") if len(get_adapter(model).edits) >= (1 if earlier else 0) + 2 else out

    monkeypatch.setattr(MoEBypass, "expert_sum", fails_in_the_second_group)
    with pytest.raises(TrainingDivergedError):
        apply_memoe_to_model(model, tokenizer, EDITS + MORE[1:], hp)
    monkeypatch.setattr(MoEBypass, "expert_sum", real)
    adapter = get_adapter(model)
    if earlier:
        assert len(adapter.edits) == 1 and torch.equal(logits(model, inputs), before)
        remove_memoe(model)
    else:
        assert adapter is None
