"""Fluency of an edited model: what the editing literature reports beside accuracy, for models too small for probes.

Two measures, both on fixed neutral text written for this project (no prompt of any evaluation file, no
edited subject):

- **n-gram entropy** of greedy continuations of :data:`NEUTRAL_PROMPTS` (the generation entropy of ROME and
  MEMIT): per continuation, the entropy in bits of its word bigram and trigram frequencies, weighted 2/3 and
  4/3 and averaged; then the mean over prompts. A model that starts repeating itself scores lower.
  Words are ``\\w+`` runs and single punctuation marks (ROME tokenises with NLTK's ``word_tokenize``, whose
  data cannot be downloaded offline; on plain prose the two split alike).
- **perplexity** of :data:`NEUTRAL_TEXTS` under teacher forcing: exp of the mean next-token loss over
  every token of every passage.

An edit that leaves the model alone leaves both unchanged; memoe-compare's ``--fluency`` scores them on the
unedited model and after the first chunk of edits (after the last, sequential), as it does the probes.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

NEUTRAL_PROMPTS = (
    "The best way to start the morning is",
    "When it rains for several days in a row,",
    "A good recipe for a simple soup needs",
    "The children spent the afternoon in the garden, where",
    "Learning to play a musical instrument takes",
    "On a long train journey, most people",
    "The old bridge over the river was",
    "To keep a small vegetable garden healthy, you should",
    "In the evening, the streets of the town",
    "The most useful thing about a bicycle is",
    "After the meeting ended, the team decided",
    "A library is a quiet place where",
    "The recipe calls for two cups of flour and",
    "During the winter months, many birds",
    "The teacher asked the students to write about",
    "Walking through the forest early in the day,",
)

NEUTRAL_TEXTS = (
    "Most towns have a market day once a week. Farmers arrive early with vegetables, eggs and bread, and set "
    "up their stalls before the shops open. By mid-morning the square is crowded with people who come as much "
    "to meet their neighbours as to buy food. In the afternoon the stalls are packed away and the square is "
    "quiet again.",
    "Making bread at home takes time but little skill. Flour, water, salt and yeast are mixed into a dough, "
    "which is kneaded until it is smooth. The dough rests for an hour or two while it rises, is shaped into a "
    "loaf, and rises again before it goes into a hot oven. The smell of baking bread fills the whole house.",
    "A river changes along its length. Near its source it is narrow and fast, cutting through rock and "
    "carrying stones downhill. Further down the valley it widens and slows, and the water drops the sand and "
    "mud it has carried. Near the sea it spreads out into a broad, slow channel lined with reeds and birds.",
    "Good sleep depends on habits as much as on comfort. Going to bed at the same time each night, keeping the "
    "room dark and cool, and avoiding bright screens late in the evening all help. A short walk during the day "
    "and a light dinner make it easier to fall asleep and to wake up rested.",
    "The first bicycles had no pedals at all. Riders pushed themselves along with their feet and lifted them "
    "to glide. Pedals attached to the front wheel came later, then a chain that drove the rear wheel, which "
    "made the machine safer and easier to ride. Today bicycles are among the most common vehicles in the world.",
)

_WORDS = re.compile(r"\w+|[^\w\s]")
WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str) -> float:
    """Mean over n = 2, 3 of the weighted entropy (bits) of the text's word n-gram frequencies (0 when the
    text has fewer than n words)."""
    words = _WORDS.findall(text.lower())
    parts = []
    for n, weight in WEIGHTS.items():
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(weight * entropy)
    return sum(parts) / len(parts)


@torch.no_grad()
def continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy continuations of ``prompts``, one at a time (no padding), decoded without the prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


@torch.no_grad()
def passage_losses(model, tokenizer, texts: Sequence[str]) -> list[tuple[float, int]]:
    """Per passage: (summed next-token loss in nats, tokens predicted), teacher-forced, one at a time."""
    device = next(model.parameters()).device
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        out.append((float(loss), ids.shape[1] - 1))
    return out


def score_fluency(model, tokenizer, prompts: Sequence[str] = NEUTRAL_PROMPTS,
                  texts: Sequence[str] = NEUTRAL_TEXTS, max_new_tokens: int = 48) -> dict:
    """What one fluency record keeps: each continuation and its n-gram entropy, each passage's loss and length."""
    was_training = model.training
    model.eval()
    try:
        texts_out = continuations(model, tokenizer, prompts, max_new_tokens)
        losses = passage_losses(model, tokenizer, texts)
    finally:
        model.train(was_training)
    return {"continuations": texts_out, "entropy": [ngram_entropy(t) for t in texts_out],
            "loss": [loss for loss, _ in losses], "tokens": [n for _, n in losses]}


def perplexity(scores: dict) -> float:
    """exp(total loss / total tokens) of a :func:`score_fluency` result."""
    return math.exp(sum(scores["loss"]) / sum(scores["tokens"]))


def fluency_change(before: dict, after: dict) -> dict:
    """Mean n-gram entropy and perplexity before and after, and how many continuations changed at all."""
    def mean(values):
        return sum(values) / len(values)
    return {"entropy_before": mean(before["entropy"]), "entropy_after": mean(after["entropy"]),
            "perplexity_before": perplexity(before), "perplexity_after": perplexity(after),
            "continuations_changed": sum(a != b for a, b in zip(before["continuations"], after["continuations"])),
            "continuations": len(after["continuations"])}
