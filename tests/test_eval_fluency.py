"""Fluency measures (eval/fluency.py): n-gram entropy of continuations and perplexity of neutral text."""
import math

import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model
from memoe_plugin.eval.fluency import (NEUTRAL_PROMPTS, NEUTRAL_TEXTS, fluency_change, ngram_entropy, perplexity,
                                       score_fluency)


def test_ngram_entropy_is_the_weighted_mean_of_bigram_and_trigram_entropies():
    # "a b a b": bigrams ab, ba, ab (2/3, 1/3); trigrams aba, bab (1/2, 1/2)
    bigram = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert math.isclose(ngram_entropy("a b a b"), (2 / 3 * bigram + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("A, b") == ngram_entropy("a , b")          # case and punctuation split alike
    assert ngram_entropy("word") == 0.0                              # too short for a bigram
    varied = "the cat sat on the mat while a dog slept by the door"
    assert ngram_entropy("the cat the cat the cat the cat the cat the cat") < ngram_entropy(varied)


def test_no_neutral_text_names_an_edited_or_evaluation_subject():
    words = " ".join(NEUTRAL_PROMPTS + NEUTRAL_TEXTS)
    assert not any(e["subject"] in words for e in EDITS)
    assert len(NEUTRAL_PROMPTS) == 16 and len(NEUTRAL_TEXTS) == 5


def test_the_guarded_adapter_leaves_fluency_exactly_unchanged_and_a_weight_change_moves_it(tokenizer):
    model = tiny_llama(len(tokenizer))
    before = score_fluency(model, tokenizer, max_new_tokens=8)
    assert len(before["entropy"]) == len(NEUTRAL_PROMPTS) and sum(before["tokens"]) > 50
    assert math.isfinite(perplexity(before)) and perplexity(before) > 1.0
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(locality_guard=True, steps=20))
    after = score_fluency(model, tokenizer, max_new_tokens=8)
    assert after == before                      # no neutral text names an edited subject: the bypass is silent
    restore()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)         # a crude edit of the weights: the model's confidence changes
    damaged = score_fluency(model, tokenizer, max_new_tokens=8)
    change = fluency_change(before, damaged)
    assert change["perplexity_after"] != change["perplexity_before"]
    assert change["continuations"] == len(NEUTRAL_PROMPTS)
