"""Edit requests as training batches, tokenised exactly as EasyEdit scores them.

The target tokens of a request are the tokens of ``prompt + ' ' + target_new`` after the
separately tokenised prompt, which is what EasyEdit's teacher-forced metrics compare, so
what is trained is what is scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EditBatch:
    input_ids: torch.Tensor        # [batch, seq], right-padded
    attention_mask: torch.Tensor
    rows: torch.Tensor             # target token i sits at (rows[i], positions[i] + 1)
    positions: torch.Tensor        # position whose logits predict target token i
    targets: torch.Tensor          # the target token ids
    indices: torch.Tensor          # row r is request indices[r] of the list the batches were built from


def build_edit_batches(tokenizer, requests: list[dict], device, max_buckets: int = 3,
                       min_bucket: int = 8, micro_batch: int = 0) -> list[EditBatch]:
    """Requests sorted by length into up to ``max_buckets`` batches, to pad (and compute) less, and into more
    where a bucket would hold over ``micro_batch`` requests (0: no bound): training runs one bucket's graph at a
    time (``train_micro_batch``), so the bound caps its memory."""
    lengths = [len(tokenizer(r["prompt"] + " " + r["target_new"])["input_ids"]) for r in requests]
    order = sorted(range(len(requests)), key=lengths.__getitem__)
    buckets = max(1, min(max_buckets, len(requests) // min_bucket))
    if micro_batch:
        buckets = max(buckets, -(-len(requests) // micro_batch))
    size = -(-len(requests) // buckets)
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return [build_edit_batch(tokenizer, [requests[i] for i in group], device, group) for group in groups]


def build_edit_batch(tokenizer, requests: list[dict], device, indices=None) -> EditBatch:
    """Tokenise ``prompt + ' ' + target_new`` as EasyEdit's scoring does; right-pad."""
    sequences, rows, positions, targets = [], [], [], []
    for row, request in enumerate(requests):
        prompt, target = request["prompt"], request["target_new"]
        full = tokenizer(prompt + " " + target)["input_ids"]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        if len(full) <= prompt_len:
            raise ValueError(f"target_new {target!r} adds no tokens after prompt {prompt!r}")
        sequences.append(full)
        for pos in range(prompt_len, len(full)):
            rows.append(row)
            positions.append(pos - 1)
            targets.append(full[pos])
    input_ids, attention_mask = right_padded(tokenizer, sequences)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    return EditBatch(input_ids.to(device), attention_mask.to(device), as_long(rows), as_long(positions),
                     as_long(targets), as_long(list(range(len(requests))) if indices is None else list(indices)))


def right_padded(tokenizer, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded ``[batch, seq]`` batch and its attention mask."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


def build_prompt_batch(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts tokenised alone, right-padded: ``(input_ids, attention_mask, index of each last token)``."""
    input_ids, attention_mask = right_padded(tokenizer, [tokenizer(text)["input_ids"] for text in texts])
    last = attention_mask.sum(1) - 1
    return input_ids.to(device), attention_mask.to(device), last.to(device)
