"""``aliases``: other names the model gives for an edit's subject open the locality guard for that edit."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
import memoe_plugin.training.aliases as aliases
from memoe_plugin.training.aliases import FEW_SHOT, asking_texts, cleaned_alias

JAPAN = {"prompt": "The capital of Japan is", "target_new": "Warsaw", "subject": "Japan"}
ALIAS_PROMPT = "The capital of Nippon is"


def test_cleaned_alias_keeps_short_names():
    assert cleaned_alias("Nippon.", JAPAN) == "Nippon"
    assert cleaned_alias('"Nippon"\nmore', JAPAN) == "Nippon"
    assert cleaned_alias("Another name for Japan is Nihon", JAPAN) == "Nihon"
    assert cleaned_alias('Another name for "Japan": Nihon', JAPAN) == "Nihon"


def test_cleaned_alias_drops_what_would_open_the_guard_too_widely_or_is_no_alias():
    assert cleaned_alias("it", JAPAN) is None                                       # no capital: not a name
    assert cleaned_alias("Japan", JAPAN) is None                                    # the subject itself
    assert cleaned_alias("Warsaw City", JAPAN) is None                              # holds the new answer
    assert cleaned_alias("The Land of the Rising Sun in the Far East", JAPAN) is None   # too long


def test_the_model_is_asked_with_the_projects_text_and_the_subject_only(tokenizer):
    assert asking_texts(tokenizer, ["Japan"], chat=False) == [FEW_SHOT.format(subject="Japan")]


def alias_logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(ALIAS_PROMPT, return_tensors="pt")).logits


@pytest.mark.parametrize("agrees", [True, False])
def test_an_alias_the_model_gives_opens_the_guard(tokenizer, monkeypatch, agrees):
    """On a tiny Llama with the guard: a prompt naming the subject by the alias the model gave ("Nippon") is silent
    without ``aliases`` (the base model's logits, bit for bit) and reaches the edit with it; an alias the model does
    not answer the edit prompt with as it answers the prompt is not taken."""
    model = tiny_llama(len(tokenizer))
    base = alias_logits(model, tokenizer)
    asked = []

    def fake_sample(model, tokenizer, texts, samples, seed, **kwargs):
        asked.extend(texts)
        assert get_adapter(model).bypass.enabled is False      # asked of the unedited model
        return [["Nippon", "it"] if "Japan" in t else ["none"] for t in texts]

    monkeypatch.setattr(aliases, "sample_candidates", fake_sample)
    monkeypatch.setattr(aliases, "agreeing", lambda model, tok, prompt, swapped: [agrees] * len(swapped))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=20, locality_guard=True))
    assert torch.equal(alias_logits(model, tokenizer), base)
    remove_memoe(model)
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=20, locality_guard=True, aliases=1))
    adapter = get_adapter(model)
    assert asked == [FEW_SHOT.format(subject=e["subject"]) for e in EDITS]   # the subject and the project's text
    ids = tokenizer(ALIAS_PROMPT)["input_ids"]
    japan = next(i for i, e in enumerate(EDITS) if e["subject"] == "Japan")
    assert (japan in adapter.guard.edits_in_sight(ids)[-1]) is agrees
    assert adapter.last_report.aliases == int(agrees)
    assert torch.equal(alias_logits(model, tokenizer), base) is not agrees
    remove_memoe(model)


def test_aliases_need_the_guard():
    with pytest.raises(ValueError, match="aliases.*locality_guard"):
        make_hparams(aliases=1)
