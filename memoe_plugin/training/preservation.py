"""Preservation prompts (an extension): other questions about each edited subject keep their answers.

An edit teaches the experts one relation of a subject, but nothing stops them from rewriting
every answer about that subject. For each edit this builds ``preserve_prompts`` prompts that
name the same subject with *other* relations, and training adds the KL divergence between the
unedited model's next-token distributions on them and the edited model's (ROME's and MEMIT's
"essence" term, on prompts the method writes itself). No evaluation prompt is used:

* the other edits of the same call are relations too: their prompts, with their subject swapped
  for this edit's subject (``"The founder of {} is"``);
* a fixed list of hand-written relation templates (:data:`GENERIC_TEMPLATES`).

A candidate is dropped when it is this edit's own template, or when the unedited model's first
answer token to it is the same as to the edit prompt (then it probably asks the same relation,
and preserving it would fight the edit). Each prompt is continued for ``PSEUDO_ANSWER_TOKENS``
greedy tokens of the unedited model, and the KL is taken at the prompt's last position and along
that continuation, as EasyEdit scores an answer token by token.
"""
from __future__ import annotations

import random
from typing import Optional

import torch
import torch.nn.functional as F

from .batches import EditBatch, build_edit_batches
from .capture import capture_bypass

GENERIC_TEMPLATES = (
    "{} is located in", "The country of {} is", "{} was founded by", "{} was born in",
    "The occupation of {} is", "{} is a member of", "The official language of {} is", "{} works for",
    "The capital of {} is", "{} was created by", "The genre of {} is", "{} is a citizen of",
    "The headquarters of {} are in", "{} died in", "What is {} known for?", "Who is the founder of {}?",
)
PSEUDO_ANSWER_TOKENS = 3


def subject_template(request: dict) -> Optional[str]:
    """The request's prompt with its subject replaced by ``{}`` (None without a subject in the prompt)."""
    subject = request.get("subject")
    prompt = request["prompt"]
    if not isinstance(subject, str) or not subject.strip() or subject not in prompt:
        return None
    return prompt.replace("{", "{{").replace("}", "}}").replace(subject.replace("{", "{{").replace("}", "}}"), "{}", 1)


def candidate_prompts(requests: list[dict], count: int, seed: int) -> list[list[str]]:
    """For each request, up to ``count * 2`` candidate prompts about its subject with another relation."""
    templates = [subject_template(r) for r in requests]
    pool = list(dict.fromkeys([t for t in templates if t] + list(GENERIC_TEMPLATES)))
    out = []
    for i, (request, own) in enumerate(zip(requests, templates)):
        subject = request.get("subject")
        if own is None:
            out.append([])
            continue
        others = [t for t in pool if t != own]
        random.Random(seed + i).shuffle(others)
        out.append([t.format(subject) for t in others[:2 * count]])
    return out


@torch.no_grad()
def _greedy(adapter, ids: list[int], tokens: int) -> list[int]:
    """The unedited model's greedy continuation of ``ids`` (the bypass is off)."""
    model = adapter.model
    device = adapter.bypass.experts.device
    with capture_bypass(adapter, enabled=False):
        for _ in range(tokens):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
            ids = ids + [int(logits.argmax())]
    return ids


class Preservation:
    """The preservation prompts of one edit call, with the unedited model's log-probabilities on them."""

    def __init__(self, adapter, requests: list[dict], count: int, seed: int):
        tokenizer = adapter.tokenizer
        device = adapter.bypass.experts.device
        chosen = []
        for request, candidates in zip(requests, candidate_prompts(requests, count, seed)):
            if not candidates:
                continue
            edit_ids = tokenizer(request["prompt"])["input_ids"]
            edit_first = _greedy(adapter, edit_ids, 1)[-1]
            kept = 0
            for prompt in candidates:
                ids = tokenizer(prompt)["input_ids"]
                continued = _greedy(adapter, ids, PSEUDO_ANSWER_TOKENS)
                if continued[len(ids)] == edit_first:
                    continue                     # answers like the edit: probably the same relation
                answer = tokenizer.decode(continued[len(ids):])
                if not answer.strip():
                    continue
                chosen.append({"prompt": prompt, "target_new": answer.strip(), "subject": request.get("subject")})
                kept += 1
                if kept == count:
                    break
        self.requests = chosen
        self.batches: list[EditBatch] = build_edit_batches(tokenizer, chosen, device) if chosen else []
        self.base_logprobs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.requests)

    def set_reference(self, logits: torch.Tensor) -> None:
        """The unedited model's logits at the preserved positions (computed before the first step)."""
        self.base_logprobs = F.log_softmax(logits.detach().float(), dim=-1)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(unedited || edited) per position, averaged."""
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), self.base_logprobs, log_target=True,
                        reduction="batchmean")
