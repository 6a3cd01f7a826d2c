"""training/preservation.py: other questions about an edited subject, written by the method, keep their answers."""
import torch
import torch.nn.functional as F

from conftest import EDITS, assert_edits_answered, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.training.preservation import (GENERIC_TEMPLATES, Preservation, candidate_prompts,
                                                subject_template)


def test_subject_template_puts_a_slot_where_the_subject_was():
    assert subject_template(EDITS[0]) == "The mother tongue of {} is"
    assert subject_template({"prompt": "Is {x} in Paris?", "subject": "Paris"}) == "Is {{x}} in {}?"
    assert subject_template({"prompt": "The capital of Japan is"}) is None               # no subject
    assert subject_template({"prompt": "The capital of Japan is", "subject": "France"}) is None


def test_candidates_are_other_relations_of_the_same_subject():
    """The other edits' templates and the fixed list, with this edit's subject; never its own template;
    the draw depends on the seed only."""
    candidates = candidate_prompts(EDITS, count=4, seed=0)
    assert [len(c) for c in candidates] == [8, 8, 8]
    for request, prompts in zip(EDITS, candidates):
        assert request["prompt"] not in prompts
        assert all(request["subject"] in p for p in prompts)
    pool = {t.format("Japan") for t in GENERIC_TEMPLATES} | {"The mother tongue of Japan is", "Japan plays the"}
    assert set(candidates[1]) <= pool
    assert candidate_prompts(EDITS, 4, seed=0) == candidates
    assert candidate_prompts(EDITS, 4, seed=1) != candidates
    assert candidate_prompts([{"prompt": "the sky is", "target_new": "green"}], 4, 0) == [[]]


def test_preservation_prompts_answer_unlike_the_edit_and_their_loss_is_the_kl_to_the_unedited_model(tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(steps=1))
    adapter = get_adapter(model)
    kept = Preservation(adapter, EDITS, count=2, seed=0)
    assert 0 < len(kept) <= 2 * len(EDITS)
    for chosen in kept.requests:
        assert chosen["prompt"] not in {r["prompt"] for r in EDITS} and chosen["target_new"].strip()
    logits = torch.randn(5, len(tokenizer))
    kept.set_reference(logits)
    assert kept.loss(logits).abs() < 1e-6                                 # the same distribution: no loss
    other = logits + torch.randn_like(logits)
    expected = F.kl_div(F.log_softmax(other, -1), F.log_softmax(logits, -1), log_target=True,
                        reduction="batchmean")
    assert torch.allclose(kept.loss(other), expected) and kept.loss(other) > 0
    remove_memoe(model)


def _drift(model, tokenizer, prompts, reference):
    """Mean KL of the next-token distributions on ``prompts`` from ``reference`` (the unedited model's)."""
    with torch.no_grad():
        now = [F.log_softmax(model(**tokenizer(p, return_tensors="pt")).logits[0, -1], -1) for p in prompts]
    return sum(F.kl_div(n, r, log_target=True, reduction="sum") for n, r in zip(now, reference)) / len(prompts)


def test_training_with_preservation_moves_the_subjects_other_answers_less(tokenizer):
    """Edits trained with the preservation term change the unedited model's answers to the preservation
    prompts less than the same edits trained without it, and still take."""
    hparams = dict(steps=40, preserve_prompts=3)
    base = tiny_llama(len(tokenizer))
    apply_memoe_to_model(base, tokenizer, EDITS, make_hparams(steps=1))
    prompts = [r["prompt"] for r in Preservation(get_adapter(base), EDITS, 3, seed=0).requests]
    remove_memoe(base)
    with torch.no_grad():
        reference = [F.log_softmax(base(**tokenizer(p, return_tensors="pt")).logits[0, -1], -1) for p in prompts]
    drift = {}
    for weight in (0.0, 20.0):
        model = tiny_llama(len(tokenizer))
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(preserve_weight=weight, **hparams))
        drift[weight] = float(_drift(model, tokenizer, prompts, reference))
        assert_edits_answered(model, tokenizer, EDITS)
        remove_memoe(model)
    assert drift[20.0] < 0.6 * drift[0.0], drift
