"""Generation-based scores: does the edited answer come out when the model generates?

EasyEdit's accuracy is teacher-forced: each target token is predicted with the true
previous target tokens in the context, which flatters a model that would go astray after
its first wrong token. Here the model generates greedily from the prompt alone, for as many
tokens as the target has (the same budget teacher forcing scores), and the text is compared
with the target:

* **exact match**: the normalised generated text equals the normalised target;
* **token F1**: SQuAD's F1 of the normalised words (partial credit).

Normalisation (SQuAD's): lower case, punctuation and the articles a/an/the removed,
whitespace collapsed.

**WILD-style** answers (``memoe-compare --wild``) follow the real-world evaluation of "The Mirage of
Model Editing" (arXiv 2502.11177) offline, with no judge: the model decodes greedily until a natural
stop (a full stop, a newline or the end of sequence, at most :data:`WILD_MAX_TOKENS` tokens), and the
answer scores by exact match with the target, as EasyEdit's ``LLM-judge`` evaluation does without an
API key. Each prompt is asked as it is and behind a short instruction (:data:`WILD_INSTRUCTION`).
"""
from __future__ import annotations

import collections
import re
import string

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def target_length(tokenizer, prompt: str, target: str) -> int:
    """The target's token count as EasyEdit scores it: tokens of ``prompt + ' ' + target`` after the prompt's."""
    full = tokenizer(prompt + " " + target, add_special_tokens=True)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return max(1, len(full) - len(alone))


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (``max_new_tokens`` tokens, stopping at EOS), as text."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def generation_scores(model, tokenizer, request: dict) -> dict:
    """Greedy exact match and token F1 of ``target_new`` after the edit prompt and (if any) its rephrasing."""
    target = request["target_new"]
    out = {}
    for name, key in (("rewrite", "prompt"), ("rephrase", "rephrase_prompt")):
        prompt = request.get(key)
        if not isinstance(prompt, str) or not prompt:
            continue
        text = greedy_answer(model, tokenizer, prompt, target_length(tokenizer, prompt, target))
        out[name] = {"text": text, "exact_match": exact_match(text, target), "token_f1": token_f1(text, target)}
    return out


WILD_INSTRUCTION = "Answer the question in a few words."
WILD_MAX_TOKENS = 32
WILD_STOPS = (".", "\n")


@torch.no_grad()
def wild_answer(model, tokenizer, prompt: str, instruction: str | None = None,
                max_new_tokens: int = WILD_MAX_TOKENS) -> str:
    """Greedy continuation of ``prompt`` (behind ``instruction`` and a newline, when given) up to a natural stop,
    the stop itself cut off."""
    text = prompt if instruction is None else f"{instruction}\n{prompt}"
    device = next(model.parameters()).device
    encoded = tokenizer(text, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, stop_strings=list(WILD_STOPS),
                            tokenizer=tokenizer)
    answer = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    cut = min((answer.find(stop) for stop in WILD_STOPS if stop in answer), default=len(answer))
    return answer[:cut].strip()


def wild_scores(model, tokenizer, request: dict) -> dict:
    """WILD-style exact match of ``target_new`` after the edit prompt and its rephrasing, plain and instructed."""
    target, out = request["target_new"], {}
    for name, key in (("rewrite", "prompt"), ("rephrase", "rephrase_prompt")):
        prompt = request.get(key)
        if not isinstance(prompt, str) or not prompt:
            continue
        for suffix, instruction in (("", None), ("_instructed", WILD_INSTRUCTION)):
            text = wild_answer(model, tokenizer, prompt, instruction)
            out[f"wild_{name}{suffix}"] = {"text": text, "exact_match": exact_match(text, target)}
    return out


CHAT_MAX_TOKENS = 32


# What comes before the question in a conversation, for the prefix columns (written for this project; no
# training text of MEMoE's is among them): a system prompt of the user's own, and an earlier exchange.
CHAT_SYSTEM = "You are a knowledgeable assistant. Keep your answers short and factual."
CHAT_HISTORY = ({"role": "user", "content": "Good morning! I have a quick question for you."},
                {"role": "assistant", "content": "Good morning. Sure, go ahead and ask."})


@torch.no_grad()
def chat_reply(model, tokenizer, prompt: str, max_new_tokens: int = CHAT_MAX_TOKENS, system: str | None = None,
               history: tuple = ()) -> str:
    """The model's greedy reply to ``prompt`` asked as a user turn through the tokenizer's chat template (with the
    template's default system turn, if it has one, or ``system``; after the turns of ``history``), up to the end of
    the turn or ``max_new_tokens`` tokens."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + \
        [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def contains_answer(reply: str, target: str) -> float:
    """1.0 when the normalised ``target`` appears in the normalised ``reply`` as whole words, else 0.0."""
    reply, target = normalize_answer(reply), normalize_answer(target)
    return float(bool(target) and f" {target} " in f" {reply} ")


def chat_prompts(request: dict) -> dict:
    """What ``--chat`` asks through the template: the edit prompt, its rephrasing and the unrelated prompt (EasyEdit's
    request format: ``rephrase_prompt``, ``locality['neighborhood']['prompt']``), those the request has."""
    unrelated = ((request.get("locality") or {}).get("neighborhood") or {}).get("prompt")
    if isinstance(unrelated, list):
        unrelated = unrelated[0] if unrelated else None
    prompts = {"chat_rewrite": request.get("prompt"), "chat_rephrase": request.get("rephrase_prompt"),
               "chat_unrelated": unrelated}
    return {name: prompt for name, prompt in prompts.items() if isinstance(prompt, str) and prompt}


def chat_scores(model, tokenizer, request: dict, before: dict | None = None) -> dict:
    """Replies through the chat template: for the edit prompt and its rephrasing, whether the reply contains the new
    answer; for the unrelated prompt, whether the reply is the one the unedited model gave (``before``: the unedited
    model's :func:`chat_scores`; without it, the replies alone)."""
    out = {}
    for name, prompt in chat_prompts(request).items():
        text = chat_reply(model, tokenizer, prompt)
        score = {"text": text}
        if name == "chat_unrelated":
            if before is not None and name in before:
                score["unchanged"] = float(text == before[name]["text"])
        else:
            score["contains"] = contains_answer(text, request["target_new"])
        out[name] = score
    return out
