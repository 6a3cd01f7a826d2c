"""Rewordings of an edit prompt written by the model being edited (``rewordings``), trained and keyed as the prompt is.

The key scope lets a position in where its layer input is near an input the edit was trained on, and a rewording with
other words ("Tankred Dorst took up work in" for "Tankred Dorst found employment in") lies further from the edit's key
than another question about the subject that shares its wording. With ``rewordings: N`` each edit is also trained on
up to N rewordings of its prompt that the unedited model writes itself, so that its keys cover more than one wording.

The model is asked through its chat template when it has one (:data:`ASK`), else it continues a few-shot prompt
(:data:`FEW_SHOT`); both were written for this project, and nothing of an evaluation file is read. Several candidates
are sampled per prompt (``ask_samples``, seeded by ``seed``, without touching the global RNG), and one is kept
only when

* it is one unfinished sentence that names the subject as the request writes it and does not hold the new answer,
  is not the prompt itself, and is at most about twice as long (:func:`cleaned`);
* the unedited model expects the same continuation after it as after the prompt: its most likely next token after the
  prompt is among its ``AGREE_TOP`` most likely after the candidate (:func:`agreeing`). A candidate that drifted to
  another question about the subject, or to no question, is dropped.

A small model writes few usable rewordings (docs/results.md measures how many, and what they buy).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

ASK = ("Rewrite this unfinished sentence with other words, keeping its meaning. Keep it unfinished and end it "
       "with \"...\".\n\n{prompt} ...")
# a base model continues this (examples written for the project, about no record of any evaluation file)
FEW_SHOT = ("Unfinished sentences, each rewritten with other words:\n"
            "The capital city of Kenya is ... => Kenya's capital is ...\n"
            "Marie Curie was born in ... => The birthplace of Marie Curie is ...\n"
            "The Eiffel Tower can be found in ... => The Eiffel Tower is located in ...\n"
            "{prompt} ... =>")
AGREE_TOP = 5
_OPEN_END = re.compile(r"\s*(\.\.\.|…)\W*$")
_LEAD = re.compile(r"^[^\"]*:\s*\"")     # 'Here is the sentence: "' before a quoted rewording


def cleaned(candidate: str, request: dict) -> Optional[str]:
    """The rewording ``candidate`` holds, without its open end, or None when it is not one usable for ``request``."""
    text = candidate.strip().split("\n")[0].strip()
    text = _LEAD.sub("", text).strip().strip("\"'").strip()
    end = _OPEN_END.search(text)
    if end is None:
        return None
    text = text[:end.start()].strip().strip("\"'").strip()
    prompt, subject, target = request["prompt"], request.get("subject") or "", request["target_new"]
    if not subject or subject not in text or target.strip().lower() in text.lower():
        return None
    if _normal(text) == _normal(prompt) or len(text.split()) > 2 * len(prompt.split()) + 4:
        return None
    return text


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def asking_texts(tokenizer, prompts: list[str], chat: bool) -> list[str]:
    """What the model continues to reword each prompt: :data:`ASK` as a user turn of its chat template, or
    :data:`FEW_SHOT`."""
    return asking(tokenizer, chat, ASK, FEW_SHOT, "prompt", prompts)


def asking(tokenizer, chat: bool, instruction: str, few_shot: str, field: str, values: list[str]) -> list[str]:
    """For each value of ``field``: ``instruction`` as a user turn of the tokenizer's chat template (``chat``), ending
    with its generation prompt, or else ``few_shot``, each with the value in place of ``{field}``."""
    if chat:
        return [tokenizer.apply_chat_template([{"role": "user", "content": instruction.format(**{field: value})}],
                                              tokenize=False, add_generation_prompt=True) for value in values]
    return [few_shot.format(**{field: value}) for value in values]


@torch.no_grad()
def sample_candidates(model, tokenizer, texts: list[str], samples: int, seed: int, max_new_tokens: int = 32,
                      batch_size: int = 16) -> list[list[str]]:
    """``samples`` sampled continuations of each text (nucleus sampling, seeded; the global RNG is left as it was)."""
    from .batches import padded
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for lo in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[lo:lo + batch_size]]
            input_ids, attention_mask = padded(tokenizer, ids, left=True)
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       do_sample=True, top_p=0.9, temperature=0.9, num_return_sequences=samples,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts_out = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
            out += [texts_out[i * samples:(i + 1) * samples] for i in range(len(ids))]
    return out


@torch.no_grad()
def agreeing(model, tokenizer, prompt: str, candidates: list[str]) -> list[bool]:
    """For each candidate, whether the model's most likely next token after ``prompt`` is among its
    :data:`AGREE_TOP` most likely after the candidate."""
    from .batches import build_prompt_batch
    device = next(model.parameters()).device
    input_ids, attention_mask, last = build_prompt_batch(tokenizer, [prompt] + candidates, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    at_last = logits[torch.arange(len(last), device=device), last]
    wanted = at_last[0].argmax()
    return [bool((row.topk(AGREE_TOP).indices == wanted).any()) for row in at_last[1:]]


def model_rewordings(model, tokenizer, requests: list[dict], count: int, samples: int, seed: int,
                     chat: bool) -> list[list[str]]:
    """Up to ``count`` rewordings of each request's prompt, from the model as it is called (the caller turns the
    bypass off), in the order they were sampled."""
    drafts = sample_candidates(model, tokenizer, asking_texts(tokenizer, [r["prompt"] for r in requests], chat),
                               samples, seed)
    kept = []
    for request, candidates in zip(requests, drafts):
        usable = list(dict.fromkeys(c for c in (cleaned(text, request) for text in candidates) if c))
        if usable:
            usable = [c for c, ok in zip(usable, agreeing(model, tokenizer, request["prompt"], usable)) if ok]
        kept.append(usable[:count])
    return kept
