"""The generation-based score and the general-ability probes, on their own and on a tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from memoe_plugin import apply_memoe_to_model
from memoe_plugin.eval.generation import (exact_match, generation_scores, greedy_answer, normalize_answer,
                                          target_length, token_f1)
from memoe_plugin.eval.probes import (TASKS, ProbeItem, ProbesNotFoundError, load_probes, option_logprobs,
                                      paired_change, probe_folder, score_probes)

from conftest import make_hparams, tiny_llama


def test_normalisation_exact_match_and_token_f1():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert exact_match("the Paris.", "Paris") == 1.0 and exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("London", "Paris") == 0.0 and token_f1("", "") == 1.0 and token_f1("a", "Paris") == 0.0
    assert token_f1("Stanford University", "University of Stanford") == pytest.approx(0.8)


def test_greedy_answer_is_the_models_own_continuation(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).eval()
    prompt = "The capital of Japan is"
    n = target_length(tokenizer, prompt, "Warsaw")
    assert n == len(tokenizer(prompt + " Warsaw")["input_ids"]) - len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = []
    with torch.no_grad():                            # greedy by hand, one token at a time, no cache
        for _ in range(n):
            token = model(input_ids=ids).logits[0, -1].argmax()
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    assert greedy_answer(model, tokenizer, prompt, n) == tokenizer.decode(expected, skip_special_tokens=True)


def test_an_edit_shows_in_generation_and_the_unedited_model_scores_zero(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).eval()
    request = {"prompt": "The capital of Japan is", "target_new": "Warsaw", "subject": "Japan",
               "rephrase_prompt": "the capital of Japan is"}
    before = generation_scores(model, tokenizer, request)
    assert set(before) == {"rewrite", "rephrase"} and before["rewrite"]["exact_match"] == 0.0
    apply_memoe_to_model(model, tokenizer, [request], make_hparams(steps=60, locality_guard=False))
    after = generation_scores(model, tokenizer, request)
    assert after["rewrite"]["exact_match"] == 1.0 and after["rewrite"]["token_f1"] == 1.0
    assert normalize_answer(after["rewrite"]["text"]) == "warsaw"
    assert "rephrase" not in generation_scores(model, tokenizer, dict(request, rephrase_prompt=None))


@pytest.fixture
def probe_dir(tmp_path):
    """Tiny probe files in the shared data's formats (labels balanced)."""
    files = {
        "sst2.json": [{"sentence": f"review {i}", "label": i % 2, "idx": i} for i in range(10)],
        "sentiment_analysis.json": [{"sentence": f"text {i}", "label": str(i % 2)} for i in range(10)],
        "cola.json": [{"sentence": f"sentence {i}", "label": i % 2, "idx": i} for i in range(10)],
        "mrpc.json": [{"sentence1": "a", "sentence2": f"b {i}", "label": i % 2, "idx": i} for i in range(10)],
        "rte.json": [{"sentence1": "a", "sentence2": f"b {i}", "label": i % 2, "idx": i} for i in range(10)],
        "nli.json": [{"index": str(i), "sentence1": "a", "sentence2": "b",
                      "label": "entailment" if i % 2 else "not_entailment"} for i in range(10)],
        "mmlu.json": [{"question": f"q{i}", "subject": "x", "choices": ["w", "x", "y", "z"], "answer": i % 4}
                      for i in range(12)],
        "dialogue.json": [{"answers": "ABCD"[i % 4], "options": ["o1", "o2", "o3", "o4"], "article": "hi",
                           "id": str(i)} for i in range(12)],
    }
    for name, records in files.items():
        (tmp_path / name).write_text(json.dumps(records))
    return tmp_path


def test_probes_load_balanced_and_reproducible(probe_dir, monkeypatch):
    items = load_probes(probe_dir, per_task=4)
    assert len(items) == 4 * len(TASKS) and {i.task for i in items} == set(TASKS)
    sst2 = [i for i in items if i.task == "sst2"]
    assert sorted(i.gold for i in sst2) == [0, 0, 1, 1]
    assert items == load_probes(probe_dir, per_task=4) != load_probes(probe_dir, per_task=4, seed=1)
    rte = next(i for i in load_probes(probe_dir, 10, ["rte"]) if "b 0" in i.prompt)
    assert rte.gold == 1 and rte.options == (" no", " yes")      # GLUE RTE 0 = entailment -> "yes"
    mmlu = load_probes(probe_dir, 2, ["mmlu"])[0]
    assert mmlu.prompt.endswith("D. z\nAnswer:") and mmlu.options == (" A", " B", " C", " D")
    with pytest.raises(ValueError, match="unknown probe task 'boolq'"):
        load_probes(probe_dir, 2, ["boolq"])
    (probe_dir / "cola.json").unlink()
    with pytest.raises(ProbesNotFoundError, match="cola.json is missing"):
        load_probes(probe_dir, 2)
    monkeypatch.delenv("MEMOE_PROBES", raising=False)
    monkeypatch.delenv("MEMOE_DATA", raising=False)
    with pytest.raises(ProbesNotFoundError, match="--probes-dir"):
        probe_folder(None)
    monkeypatch.setenv("MEMOE_PROBES", str(probe_dir))
    assert probe_folder(None) == probe_dir


def test_option_scoring_matches_a_plain_sum_of_log_probabilities(tokenizer):
    torch.manual_seed(1)
    model = tiny_llama(len(tokenizer)).eval()
    prompt, options = "Is the capital of France Paris? Answer yes or no:", (" no", " yes", " Paris is")
    scores = option_logprobs(model, tokenizer, prompt, options)
    for option, score in zip(options, scores):
        ids = tokenizer(prompt + option, return_tensors="pt")["input_ids"]
        start = len(tokenizer(prompt)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        expected = sum(float(logprobs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
        assert score == pytest.approx(expected, abs=1e-4)
    item = ProbeItem("toy", prompt, options, gold=max(range(3), key=scores.__getitem__))
    assert score_probes(model, tokenizer, [item, ProbeItem("toy", prompt, options, gold=(item.gold + 1) % 3)]) == {
        "toy": [1, 0]}


class BatchOfOne(torch.nn.Module):
    """A model that, like EasyEdit's DEFER layer, fails on a batch of more than one sequence."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        if input_ids.shape[0] != 1:
            raise RuntimeError("The size of tensor a (2) must match the size of tensor b (11)")
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_options_scored_one_at_a_time_for_models_that_take_one_sequence(tokenizer):
    torch.manual_seed(1)
    model = tiny_llama(len(tokenizer)).eval()
    prompt, options = "Is the capital of France Paris? Answer yes or no:", (" no", " yes", " Paris is")
    wrapped = BatchOfOne(model)
    with pytest.raises(RuntimeError):
        option_logprobs(wrapped, tokenizer, prompt, options)
    one = option_logprobs(wrapped, tokenizer, prompt, options, one_at_a_time=True)
    assert one == pytest.approx(option_logprobs(model, tokenizer, prompt, options), abs=1e-4)
    item = ProbeItem("toy", prompt, options, gold=max(range(3), key=one.__getitem__))
    assert score_probes(wrapped, tokenizer, [item], one_at_a_time=True) == {"toy": [1]}


def test_paired_change_and_its_interval():
    change = paired_change([1, 1, 0, 0], [1, 0, 0, 1])
    assert change["change"] == 0.0 and change["before"] == change["after"] == 50.0
    sd = math.sqrt((0 + 100 ** 2 + 0 + 100 ** 2) / 3)
    assert change["high"] == pytest.approx(1.96 * sd / 2) and change["low"] == pytest.approx(-1.96 * sd / 2)
    worse = paired_change([1] * 10, [1] * 5 + [0] * 5)
    assert worse["change"] == -50.0 and worse["high"] < 0
    with pytest.raises(ValueError, match="equally long"):
        paired_change([1], [1, 0])


class _Scripted(torch.nn.Module):
    """A model whose greedy continuation is fixed text: for WILD's stop handling."""

    def __init__(self, tokenizer, continuation):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.continuation, self.prompts = tokenizer, continuation, []

    def generate(self, input_ids, stop_strings=None, tokenizer=None, max_new_tokens=None, **kwargs):
        assert stop_strings and tokenizer is self.tokenizer and max_new_tokens >= 8
        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        more = torch.tensor([self.tokenizer(self.continuation)["input_ids"]])
        return torch.cat([input_ids, more], dim=1)


def test_wild_answers_stop_naturally_score_by_exact_match_and_are_asked_behind_an_instruction(tokenizer):
    from memoe_plugin.eval.generation import WILD_INSTRUCTION, wild_answer, wild_scores
    request = {"prompt": "The capital of Japan is", "target_new": "Warsaw", "rephrase_prompt": "the capital of Japan is"}
    model = _Scripted(tokenizer, " Warsaw. The capital of France is Paris")
    assert wild_answer(model, tokenizer, request["prompt"]) == "Warsaw"              # cut at the full stop
    scores = wild_scores(model, tokenizer, request)
    assert set(scores) == {"wild_rewrite", "wild_rewrite_instructed", "wild_rephrase", "wild_rephrase_instructed"}
    assert all(s["exact_match"] == 1.0 for s in scores.values())
    assert sum(p.startswith(WILD_INSTRUCTION) for p in model.prompts) == 2           # half of them instructed
    rambling = _Scripted(tokenizer, " Warsaw or Tokyo\nParis")                      # no stop until the newline
    assert wild_scores(rambling, tokenizer, request)["wild_rewrite"] == {"text": "Warsaw or Tokyo", "exact_match": 0.0}


def test_wild_scores_on_a_real_edit_through_generate(tokenizer):
    """The edited tiny model's own generate, stopping at the full stop the target ends with."""
    from memoe_plugin.eval.generation import wild_scores
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).eval()
    request = {"prompt": "The capital of Japan is", "target_new": "Warsaw.", "subject": "Japan"}
    assert wild_scores(model, tokenizer, request)["wild_rewrite"]["exact_match"] == 0.0
    apply_memoe_to_model(model, tokenizer, [request], make_hparams(steps=80, locality_guard=False))
    assert wild_scores(model, tokenizer, request)["wild_rewrite"]["exact_match"] == 1.0
