"""Reading EasyEdit's per-edit metric dicts: reliability, generality, locality and their means."""
from __future__ import annotations

import math
import re
from typing import Optional

SCORES = ("reliability", "generality", "locality", "same_subject")
# EasyEdit locality keys that hold other facts about the edited subject (KnowEdit's name); every
# other locality key (``neighborhood``: prompts about other subjects) counts as unrelated locality.
SAME_SUBJECT_KEYS = ("Relation_Specificity",)


def flat_mean(value) -> Optional[float]:
    """Mean of a number or a (nested) list of numbers; None when there is nothing numeric."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        flat = [flat_mean(v) for v in value]
        flat = [v for v in flat if v is not None]
        return sum(flat) / len(flat) if flat else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def case_scores(metric: dict) -> dict:
    """Reliability / generality / unrelated and same-subject locality of one EasyEdit metric dict, in [0, 1]
    (None when absent)."""
    post = metric.get("post", {})
    locality = post.get("locality", {}) or {}
    same = [f"{k}_acc" for k in SAME_SUBJECT_KEYS]

    def mean_of(keys):
        values = [flat_mean(locality[k]) for k in keys]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    return {"reliability": flat_mean(post.get("rewrite_acc")),
            "generality": flat_mean(post.get("rephrase_acc")),
            "locality": mean_of([k for k in locality if k.endswith("_acc") and k not in same]),
            "same_subject": mean_of([k for k in locality if k in same])}


# Generation-based scores (generation.py): greedy exact match and token F1 after the edit prompt
# (rewrite) and after its rephrasing; next to the teacher-forced ones, not part of the average.
GENERATION_SCORES = {"gen_em": ("rewrite", "exact_match"), "gen_f1": ("rewrite", "token_f1"),
                     "gen_em_rephrase": ("rephrase", "exact_match"), "gen_f1_rephrase": ("rephrase", "token_f1"),
                     # WILD-style (memoe-compare --wild): natural stop, exact match; plain and behind an instruction
                     "wild_em": ("wild_rewrite", "exact_match"), "wild_em_rephrase": ("wild_rephrase", "exact_match"),
                     "wild_em_instructed": ("wild_rewrite_instructed", "exact_match"),
                     "wild_em_rephrase_instructed": ("wild_rephrase_instructed", "exact_match"),
                     # asked through the chat template (memoe-compare --chat): the reply contains the new answer;
                     # the unrelated prompt's reply is the unedited model's
                     "chat_edit": ("chat_rewrite", "contains"), "chat_rephrase": ("chat_rephrase", "contains"),
                     "chat_unrelated": ("chat_unrelated", "unchanged")}


# KnowEdit's portability parts, as EasyEdit names their scores (``<kind>_acc`` in ``post["portability"]``).
PORTABILITY_PARTS = {"portability_aliases": "Subject_Aliasing", "portability_reasoning": "Reasoning",
                     "portability_logical": "Logical_Generalization"}


def aggregate(metrics: list[dict]) -> dict:
    """Mean scores in % over edits, and their average (None where a score is absent)."""
    scores = [case_scores(m) for m in metrics]
    out = {}
    portability = [flat_mean([flat_mean(v) for k, v in (m.get("post", {}).get("portability") or {}).items()
                              if k.endswith("_acc")]) for m in metrics]
    portability = [p for p in portability if p is not None]
    # KnowEdit's portability (answers that follow from the edit), reported beside the average, not in it.
    out["portability"] = 100.0 * sum(portability) / len(portability) if portability else None
    for key, kind in PORTABILITY_PARTS.items():   # each part over the edits that have it
        values = [flat_mean(m["post"]["portability"][f"{kind}_acc"]) for m in metrics
                  if f"{kind}_acc" in (m.get("post", {}).get("portability") or {})]
        values = [v for v in values if v is not None]
        out[key] = 100.0 * sum(values) / len(values) if values else None
    for key, (prompt, score) in GENERATION_SCORES.items():
        values = [m["generation"][prompt][score] for m in metrics if prompt in (m.get("generation") or {})]
        out[key] = 100.0 * sum(values) / len(values) if values else None
    for key in SCORES:
        values = [s[key] for s in scores if s[key] is not None]
        out[key] = 100.0 * sum(values) / len(values) if values else None
    # The unedited model's reliability on the same edits: how much of a target it already predicted, so that
    # a run that leaves the model as it was can be told from one that edits (memoe-tune's eligibility rule).
    pre = [flat_mean(m.get("pre", {}).get("rewrite_acc")) for m in metrics]
    pre = [v for v in pre if v is not None]
    out["pre_reliability"] = 100.0 * sum(pre) / len(pre) if pre else None
    # The same for greedy exact match on the edit prompt (memoe-tune --criterion generation).
    pre_em = [m["pre_generation"]["rewrite"]["exact_match"] for m in metrics
              if "rewrite" in (m.get("pre_generation") or {})]
    out["pre_gen_em"] = 100.0 * sum(pre_em) / len(pre_em) if pre_em else None
    # CounterFact's rephrasings are of two kinds (ROME's paraphrase prompts: an unrelated sentence, then the fact
    # reworded; and its generation prompts, which often ask another fact of the subject): generality of each
    for kind, wanted in (("generality_paraphrase", True), ("generality_other", False)):
        values = [flat_mean(m.get("post", {}).get("rephrase_acc")) for m in metrics
                  if is_paraphrase_prompt(*_rephrase_and_subject(m)) == wanted]
        values = [v for v in values if v is not None]
        out[kind] = 100.0 * sum(values) / len(values) if values else None
    parts = [out[k] for k in SCORES if out[k] is not None]
    # The paper's average is over reliability, generality and locality; where the data also
    # scores same-subject locality (KnowEdit), it is the fourth column of the mean.
    out["average"] = sum(parts) / len(parts) if parts and out["reliability"] is not None else None
    return out


_SENTENCE_END = re.compile(r"[.!?:;\n][\"')\]]*\s")


def is_paraphrase_prompt(prompt: Optional[str], subject: Optional[str]) -> Optional[bool]:
    """Whether ``prompt`` puts a sentence of other text before the fact (ROME's paraphrase prompts: "A Maranon Week is
    annually held since 1990. Howard Glacier is in"): the text before the subject's first mention ends a sentence.
    None when the prompt or subject is missing or the subject is not in the prompt."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        return None
    at = prompt.lower().find(subject.strip().lower())
    if at < 0:
        return None
    return bool(_SENTENCE_END.search(prompt[:at] + " "))


def _rephrase_and_subject(metric: dict) -> tuple[Optional[str], Optional[str]]:
    request = metric.get("requested_rewrite") or {}
    return request.get("rephrase_prompt"), request.get("subject")


def mean_post(metrics: list[dict], key: str) -> float:
    """Mean of one post-edit metric over edits (NaN when no edit has it)."""
    values = [flat_mean(m.get("post", {}).get(key)) for m in metrics]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def target_predictions(model, tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Greedy teacher-forced predictions of ``target``'s tokens after ``prompt``, and the tokens themselves.

    Tokenised as EasyEdit scores: ``prompt + ' ' + target``, the target being the tokens after the
    separately tokenised prompt.
    """
    import torch
    full = tokenizer(prompt + " " + target)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full], device=device)).logits[0]
    return logits[start - 1:len(full) - 1].argmax(-1).tolist(), full[start:]


def token_accuracy(model, tokenizer, prompt: str, target: str) -> float:
    """Share of ``target``'s tokens predicted after ``prompt`` (EasyEdit's ``rewrite_acc`` for one edit)."""
    predicted, wanted = target_predictions(model, tokenizer, prompt, target)
    return sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)
