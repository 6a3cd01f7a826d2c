"""Routing features from token ids: knowledge anchors, sentence means, or nothing.

Anchors are *causal*: the feature at position ``t`` is computed from the text of
tokens ``0..t`` only (padding and special tokens skipped). Hence

* answer tokens appended to a prompt never change the anchor of any prompt
  position; the position that predicts the first answer token routes exactly as
  the bare prompt does;
* a teacher-forced pass over ``prompt + answer`` and ``generate`` with a KV cache
  produce the same routing, token for token;
* the padding side does not matter.

Anchor at ``t`` = average over the entities found in the prefix text of the mean
input-embedding row of each entity's tokens (the entity string tokenised on its
own, so an entity has one embedding wherever it appears). A prefix with no
entity gets the zero vector: the gate then routes on the token alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .lru import LRU

Extractor = Callable[[str], list]

# Text the anchors and the guard must be able to read back from token ids.
DECODE_PROBES = ("The mother tongue of Danielle Darrieux is French.",
                 "What university did Watts Humphrey attend? Stanford University")


class TokenizerRoundTripError(ValueError):
    """The tokenizer's decode does not give back the text it encoded, so anchors cannot be found."""


def check_round_trip(tokenizer, model_name: str = "") -> None:
    """Refuse a tokenizer whose ``decode(encode(text))`` loses the words of ``text``.

    Anchors and the locality guard read the entities from the decoded ids, so a tokenizer that
    drops spaces (as SmolLM2 exports made under transformers 5.5.4 by memoe_plugin 0.1 did) would
    route and guard on text no extractor can read. Whitespace runs may change; words may not.
    """
    for text in DECODE_PROBES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if back.split() != text.split():
            where = f" of {model_name}" if model_name else ""
            raise TokenizerRoundTripError(
                f"the tokenizer{where} does not give text back: {text!r} decodes to {back!r}. MEMoE finds "
                "knowledge anchors in the decoded text, so it cannot route or guard with this tokenizer. "
                "Fix the tokenizer files; a SmolLM2 directory from memoe-export-smollm2 is rewritten "
                "correctly by 'memoe-export-smollm2 --overwrite'. Or set routing_input: token (or sentence) "
                "with locality_guard: false, which need no decoding.")


class RoutingFeatureEncoder:
    """Turns the real (unpadded) token ids of one sequence into ``[len, dim]`` features."""

    def __init__(self, tokenizer, embedding: nn.Embedding, mode: str,
                 extractor: Optional[Extractor] = None, cache_size: int = 4096):
        if mode not in ("anchor", "sentence", "token"):
            raise ValueError(f"routing_input {mode!r}: expected anchor, sentence or token")
        if mode == "anchor" and extractor is None:
            raise ValueError("routing_input 'anchor' needs an entity extractor")
        self.tokenizer, self.embedding, self.mode = tokenizer, embedding, mode
        self.extractor = extractor
        self.dim = 0 if mode == "token" else embedding.weight.shape[1]
        # ids -> per-position entity tuples, run-length encoded: ((count, entities), ...)
        self._entity_runs = LRU(cache_size)
        self._entity_vectors = LRU(max(cache_size, 64))   # entity string -> [dim]
        self.extractor_calls = 0

    # ---------------------------------------------------------------- public
    def features(self, ids: Sequence[int]) -> torch.Tensor:
        """Features for positions ``0..len(ids)-1`` of one sequence of real tokens."""
        weight = self.embedding.weight
        if self.mode == "token" or len(ids) == 0:
            return weight.new_zeros(len(ids), self.dim)
        if self.mode == "sentence":
            rows = weight[torch.as_tensor(list(ids), device=weight.device)].detach().float()
            counts = torch.arange(1, len(ids) + 1, device=weight.device, dtype=torch.float32).unsqueeze(-1)
            return (rows.cumsum(0) / counts).to(weight.dtype)
        runs = self.entity_runs(tuple(ids))
        pieces = [self.anchor_vector(entities).expand(count, -1) for count, entities in runs]
        return torch.cat(pieces, dim=0)

    def entity_runs(self, ids: tuple) -> tuple:
        """The entities of every prefix of ``ids``, as runs of equal entity tuples."""
        cached = self._entity_runs.lookup(ids)
        if cached is not None:
            return cached
        parent = self._entity_runs.lookup(ids[:-1]) if len(ids) > 1 else None
        if parent is not None:   # generation: one more token on a known prefix
            runs = _append_run(list(parent), self._prefix_entities(ids))
        else:
            runs = []
            for end in range(1, len(ids) + 1):
                runs = _append_run(runs, self._prefix_entities(ids[:end]))
        return self._entity_runs.store(ids, tuple(runs))

    def anchor_vector(self, entities: tuple) -> torch.Tensor:
        """Average of the entities' mean token embeddings; zeros when there is none."""
        weight = self.embedding.weight
        if not entities:
            return weight.new_zeros(1, self.dim)
        vectors = [self._entity_vector(text) for text in entities]
        return torch.stack(vectors).mean(0, keepdim=True)

    def prompt_entities(self, ids: Sequence[int]) -> tuple:
        """The entities of the whole sequence (what the last position routes on)."""
        return self.entity_runs(tuple(ids))[-1][1] if len(ids) else ()

    # --------------------------------------------------------------- helpers
    def _prefix_entities(self, ids: tuple) -> tuple:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        self.extractor_calls += 1
        return tuple(entity.text for entity in self.extractor(text))

    def _entity_vector(self, text: str) -> torch.Tensor:
        vector = self._entity_vectors.lookup(text)
        if vector is None:
            weight = self.embedding.weight
            token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows = weight[torch.as_tensor(token_ids, device=weight.device)].detach()
            vector = self._entity_vectors.store(text, rows.float().mean(0).to(weight.dtype))
        return vector


def _append_run(runs: list, entities: tuple) -> list:
    if runs and runs[-1][1] == entities:
        runs[-1] = (runs[-1][0] + 1, entities)
    else:
        runs.append((1, entities))
    return runs
