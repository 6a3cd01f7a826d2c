"""General-ability probes (paper Section 5.1, Figure 3): does editing hurt what the model could already do?

The probe sets are the class-balanced files of ``general/`` in the shared data (SST-2, MRPC,
CoLA, RTE, NLI, MMLU, sentiment, MuTual dialogue; their README gives provenance and label
meanings). Each item becomes a prompt and a closed set of answer options; the model's answer
is the option with the highest total log-probability after the prompt (no generation, no
parsing), and an item scores 1 when that is the gold option.

What is reported is the *change* from the unedited model on the same items: the mean of the
per-item differences (after - before), with a 95 % confidence interval from their standard
error (a paired comparison, so the items' own difficulty cancels out).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

PROBES_ENV = "MEMOE_PROBES"
YES_NO = (" no", " yes")
LETTERS = (" A", " B", " C", " D")


@dataclass(frozen=True)
class ProbeItem:
    task: str
    prompt: str
    options: tuple[str, ...]
    gold: int


def _lettered(options) -> str:
    return "\n".join(f"{letter.strip()}. {text}" for letter, text in zip(LETTERS, options))


# task -> (file name, item -> ProbeItem)
TASKS: dict[str, tuple[str, Callable[[dict], ProbeItem]]] = {
    "sst2": ("sst2.json", lambda r: ProbeItem(
        "sst2", f"Review: {r['sentence'].strip()}\nIs this review positive? Answer yes or no:", YES_NO,
        int(r["label"]))),
    "sentiment": ("sentiment_analysis.json", lambda r: ProbeItem(
        "sentiment", f"Review: {r['sentence'].strip()}\nIs this review positive? Answer yes or no:", YES_NO,
        int(r["label"]))),
    "cola": ("cola.json", lambda r: ProbeItem(
        "cola", f"Sentence: {r['sentence'].strip()}\nIs this sentence grammatically acceptable? Answer yes or no:",
        YES_NO, int(r["label"]))),
    "mrpc": ("mrpc.json", lambda r: ProbeItem(
        "mrpc", f"Sentence 1: {r['sentence1'].strip()}\nSentence 2: {r['sentence2'].strip()}\n"
                "Do both sentences mean the same thing? Answer yes or no:", YES_NO, int(r["label"]))),
    "rte": ("rte.json", lambda r: ProbeItem(   # GLUE RTE: 0 = entailment
        "rte", f"Premise: {r['sentence1'].strip()}\nHypothesis: {r['sentence2'].strip()}\n"
               "Does the premise entail the hypothesis? Answer yes or no:", YES_NO, 1 - int(r["label"]))),
    "nli": ("nli.json", lambda r: ProbeItem(
        "nli", f"Premise: {r['sentence1'].strip()}\nHypothesis: {r['sentence2'].strip()}\n"
               "Does the premise entail the hypothesis? Answer yes or no:", YES_NO,
        int(r["label"] == "entailment"))),
    "mmlu": ("mmlu.json", lambda r: ProbeItem(
        "mmlu", f"Question: {r['question'].strip()}\n{_lettered(r['choices'])}\nAnswer:", LETTERS, int(r["answer"]))),
    "dialogue": ("dialogue.json", lambda r: ProbeItem(
        "dialogue", f"Dialogue: {r['article'].strip()}\nWhich reply comes next?\n{_lettered(r['options'])}\nAnswer:",
        LETTERS, "ABCD".index(r["answers"].strip()))),
}


class ProbesNotFoundError(FileNotFoundError):
    """The probe folder or one of its files is missing; the message says which and where to get it."""


def probe_folder(explicit: Optional[os.PathLike] = None) -> Path:
    """``explicit``, else ``$MEMOE_PROBES``, else ``$MEMOE_DATA/general``."""
    candidates = [explicit, os.environ.get(PROBES_ENV)]
    if os.environ.get("MEMOE_DATA"):
        candidates.append(Path(os.environ["MEMOE_DATA"]) / "general")
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser()
    raise ProbesNotFoundError(
        "no general-ability probe folder: pass --probes-dir, or set $MEMOE_PROBES (or $MEMOE_DATA with a "
        f"general/ folder). It must hold {', '.join(spec[0] for spec in TASKS.values())} (the shared data's "
        "general/ folder: GLUE/MMLU/MuTual subsets from AlphaEdit's glue_eval)")


def load_probes(folder: os.PathLike, per_task: int = 50, tasks: Optional[list[str]] = None,
                seed: int = 0) -> list[ProbeItem]:
    """``per_task`` items of each task, drawn reproducibly and balanced over the gold options."""
    folder = Path(folder)
    items = []
    for task in tasks or list(TASKS):
        if task not in TASKS:
            raise ValueError(f"unknown probe task {task!r}; known: {', '.join(TASKS)}")
        name, make = TASKS[task]
        path = folder / name
        if not path.is_file():
            raise ProbesNotFoundError(f"probe file {path} is missing (task {task})")
        try:
            records = json.loads(path.read_text())
            made = [make(r) for r in records]
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not the expected probe format for {task} ({type(err).__name__}: {err})") from None
        by_gold: dict[int, list[ProbeItem]] = {}
        for item in made:
            by_gold.setdefault(item.gold, []).append(item)
        rng = random.Random(f"{seed}:{task}")
        for group in by_gold.values():
            rng.shuffle(group)
        chosen, k = [], 0
        while len(chosen) < min(per_task, len(made)):     # round robin over the gold options
            for gold in sorted(by_gold):
                if k < len(by_gold[gold]) and len(chosen) < per_task:
                    chosen.append(by_gold[gold][k])
            k += 1
        items.extend(chosen)
    return items


@torch.no_grad()
def option_logprobs(model, tokenizer, prompt: str, options: tuple[str, ...], one_at_a_time: bool = False) -> list[float]:
    """Total log-probability of each option's tokens after ``prompt``: one batched forward, or with
    ``one_at_a_time`` one unpadded forward per option (for models that take a batch of one sequence only)."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt)["input_ids"]
    rows = [tokenizer(prompt + option)["input_ids"] for option in options]
    groups = [[i] for i in range(len(rows))] if one_at_a_time else [list(range(len(rows)))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    scores = [0.0] * len(rows)
    for group in groups:
        width = max(len(rows[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for j, i in enumerate(group):                    # right padding: positions stay as in one sequence
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for j, i in enumerate(group):
            row = rows[i]
            start = len(prompt_ids) if row[:len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
            start = max(1, min(start, len(row) - 1))
            scores[i] = float(sum(logprobs[j, t - 1, row[t]] for t in range(start, len(row))))
    return scores


def score_probes(model, tokenizer, items: list[ProbeItem], one_at_a_time: bool = False) -> dict[str, list[int]]:
    """Per task, 1/0 for each item: is the most likely option the gold one? (``one_at_a_time``: see
    :func:`option_logprobs`.)"""
    out: dict[str, list[int]] = {}
    for item in items:
        scores = option_logprobs(model, tokenizer, item.prompt, item.options, one_at_a_time)
        out.setdefault(item.task, []).append(int(max(range(len(scores)), key=scores.__getitem__) == item.gold))
    return out


def paired_change(before: list[int], after: list[int]) -> dict:
    """Mean change in accuracy (points of %), with a 95 % normal-approximation interval of the paired differences."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired change needs two equally long non-empty lists, got {len(before)} and {len(after)}")
    diffs = [100.0 * (a - b) for a, b in zip(after, before)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"before": 100.0 * sum(before) / n, "after": 100.0 * sum(after) / n, "change": mean,
            "low": mean - half, "high": mean + half, "items": n}
