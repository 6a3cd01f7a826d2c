"""Edit requests as training batches, tokenised exactly as EasyEdit scores them.

The target tokens of a request are the tokens of ``prompt + ' ' + target_new`` after the
separately tokenised prompt, which is what EasyEdit's teacher-forced metrics compare, so
what is trained is what is scored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


# A request key: train only this many of the answer's first tokens (the row ends after them). The chat-wrapped copy
# of an edit (``chat_answer: first``) trains the reply's first token; the raw prompt's keys read the rest.
ANSWER_TOKENS = "_answer_tokens"


@dataclass
class EditBatch:
    input_ids: torch.Tensor        # [batch, seq], left-padded: every row's last token in the last column
    attention_mask: torch.Tensor
    rows: torch.Tensor             # target token i sits at (rows[i], positions[i] + 1)
    positions: torch.Tensor        # position whose logits predict target token i
    targets: torch.Tensor          # the target token ids
    indices: torch.Tensor          # row r is request indices[r] of the list the batches were built from
    position_ids: torch.Tensor     # [batch, seq]: each row's own token positions (0 at its first real token)
    complete: torch.Tensor         # [batch] bool: the row holds its whole answer (not only its first tokens:
                                   # ``ANSWER_TOKENS``), so the answer ends in it

    def model_inputs(self, start: int = 0, stop: Optional[int] = None) -> dict:
        """Keyword arguments of a model call on columns ``start:stop``: the ids, the attention mask of columns
        ``0:stop`` (a call after a cached prefix sees it), and the rows' own positions, so that padding shifts no
        position (a model with absolute positions, GPT-2, computes exactly what it computes on the row alone)."""
        return {"input_ids": self.input_ids[:, start:stop], "attention_mask": self.attention_mask[:, :stop],
                "position_ids": self.position_ids[:, start:stop]}


def build_edit_batches(tokenizer, requests: list[dict], device, max_buckets: int = 3,
                       min_bucket: int = 8, micro_batch: int = 0) -> list[EditBatch]:
    """Requests sorted by length into up to ``max_buckets`` batches, to pad (and compute) less, and into more
    where a bucket would hold over ``micro_batch`` requests (0: no bound): training runs one bucket's graph at a
    time (``train_micro_batch``), so the bound caps its memory."""
    lengths, answers = [], []
    for request in requests:
        full, prompt_len, _ = tokenized(tokenizer, request)
        lengths.append(len(full))
        answers.append(len(full) - prompt_len)
    # rows are left-padded, and the layers above the adapter run from a bucket's first column where the bypass
    # acts, which the longest answer sets: rows with answers of one length train together
    order = sorted(range(len(requests)), key=lambda i: (answers[i], lengths[i]))
    buckets = max(1, min(max_buckets, len(requests) // min_bucket))
    if micro_batch:
        buckets = max(buckets, -(-len(requests) // micro_batch))
    size = -(-len(requests) // buckets)
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return [build_edit_batch(tokenizer, [requests[i] for i in group], device, group) for group in groups]


def build_edit_batch(tokenizer, requests: list[dict], device, indices=None) -> EditBatch:
    """Tokenise ``prompt + ' ' + target_new`` as EasyEdit's scoring does; left-pad, so that the answers of all rows
    sit in the last columns (training runs the layers above the adapter only from the first column where the bypass
    acts in some row: ``fast_path``)."""
    sequences, prompt_lengths, rows, positions, targets, complete = [], [], [], [], [], []
    for request in requests:
        full, prompt_len, whole = tokenized(tokenizer, request)
        sequences.append(full)
        prompt_lengths.append(prompt_len)
        complete.append(whole)
    width = max(len(s) for s in sequences)
    for row, (full, prompt_len) in enumerate(zip(sequences, prompt_lengths)):
        pad = width - len(full)
        for pos in range(prompt_len, len(full)):
            rows.append(row)
            positions.append(pad + pos - 1)
            targets.append(full[pos])
    input_ids, attention_mask = padded(tokenizer, sequences, left=True)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)   # noqa: E731
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return EditBatch(input_ids.to(device), attention_mask.to(device), as_long(rows), as_long(positions),
                     as_long(targets), as_long(list(range(len(requests))) if indices is None else list(indices)),
                     position_ids.to(device), torch.tensor(complete, dtype=torch.bool, device=device))


def without_the_last_column(batch: EditBatch) -> EditBatch:
    """``batch`` without its last column, where no row predicts a target (each row's last token is the last target
    itself): under causal attention every target's logits are the same without it, and training runs one column
    less through the layers above the adapter."""
    last = int(batch.positions.max()) + 1
    if last >= batch.input_ids.shape[1]:
        return batch
    return dataclasses.replace(batch, input_ids=batch.input_ids[:, :last],
                               attention_mask=batch.attention_mask[:, :last], position_ids=batch.position_ids[:, :last])


def tokenized(tokenizer, request: dict) -> tuple[list[int], int, bool]:
    """The ids of ``prompt + ' ' + target_new`` as EasyEdit's scoring tokenises them (cut after the first
    ``request[ANSWER_TOKENS]`` answer tokens when it is set), how many of them are the prompt's, and whether the
    whole answer is in them."""
    prompt, target = request["prompt"], request["target_new"]
    full = tokenizer(prompt + " " + target)["input_ids"]
    prompt_len = len(tokenizer(prompt)["input_ids"])
    if len(full) <= prompt_len:
        raise ValueError(f"target_new {target!r} adds no tokens after prompt {prompt!r}")
    kept = request.get(ANSWER_TOKENS)
    if kept is not None and prompt_len + kept < len(full):
        return full[:prompt_len + kept], prompt_len, False
    return full, prompt_len, True


def repeats_answer(tokenizer, raw: dict, reply: dict) -> bool:
    """Do the answer tokens of ``reply`` (a chat-wrapped copy) start with those of ``raw`` (the prompt as it is)? A
    template can tokenise the answer's first word otherwise after its generation prompt; then the raw answer's keys
    are not the reply's."""
    raw_ids, raw_len, _ = tokenized(tokenizer, raw)
    reply_ids, reply_len, _ = tokenized(tokenizer, reply)
    answer = raw_ids[raw_len:]
    return reply_ids[reply_len:reply_len + len(answer)] == answer


def padded(tokenizer, sequences: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one ``[batch, seq]`` batch, right- (or ``left``-) padded, and its attention mask."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        where = slice(width - len(seq), width) if left else slice(0, len(seq))
        input_ids[row, where] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, where] = 1
    return input_ids, attention_mask


def build_prompt_batch(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts tokenised alone, right-padded: ``(input_ids, attention_mask, index of each last token)``."""
    input_ids, attention_mask = padded(tokenizer, [tokenizer(text)["input_ids"] for text in texts])
    last = attention_mask.sum(1) - 1
    return input_ids.to(device), attention_mask.to(device), last.to(device)
