"""Other names for an edit's subject, given by the model being edited (``aliases``), for the locality guard.

The guard opens only where an edit's anchors (its subject, the entities of its prompt) are in the prefix, so a
question that names the subject otherwise ("Obama" for "Barack Obama") never reaches the edit. With ``aliases: N``
the unedited model is asked, once per edit, for other names of the subject (:data:`ASK` through its chat template,
else the few-shot :data:`FEW_SHOT`; both written for this project, nothing of an evaluation file read), and up to N
of its answers become anchors of the edit too. A name is kept only when

* it is short (at most :data:`MAX_WORDS` words), is not the subject itself, holds no new answer, and has a capital
  letter or a digit (a name, not "the" or "it", which would open the guard on every prompt);
* the model answers the edit prompt with the name in place of the subject as it answers the prompt itself
  (``rewordings.agreeing``): the model takes it for the same thing.

The key scope still decides each position: an alias opens the guard, it does not put a position in scope.
"""
from __future__ import annotations

import re
from typing import Optional

from .rewordings import agreeing, asking, sample_candidates

ASK = "What is another name for \"{subject}\"? Reply with the name only."
FEW_SHOT = ("Other names:\n"
            "United States of America => USA\n"
            "Johann Sebastian Bach => J. S. Bach\n"
            "Manchester United F.C. => Man United\n"
            "{subject} =>")
MAX_WORDS = 6
_NAME = re.compile(r"[A-Z0-9]")


def cleaned_alias(candidate: str, request: dict) -> Optional[str]:
    """The name ``candidate`` gives for the request's subject, or None when it is not a usable one."""
    text = candidate.strip().split("\n")[0].strip()
    text = re.sub(r"^(another name for .*?(\bis\b|:)|it is also (known|called) as|also known as)\s*", "", text,
                  flags=re.IGNORECASE)
    text = text.strip().strip("\"'.,;:!").strip()
    subject, target = request.get("subject") or "", request["target_new"]
    words = text.split()
    if not words or len(words) > MAX_WORDS or len(text) < 2 or not _NAME.search(text):
        return None
    if text.lower() == subject.strip().lower() or target.strip().lower() in text.lower():
        return None
    return text


def asking_texts(tokenizer, subjects: list[str], chat: bool) -> list[str]:
    """What the model continues to name each subject otherwise: :data:`ASK` through its chat template, or
    :data:`FEW_SHOT`."""
    return asking(tokenizer, chat, ASK, FEW_SHOT, "subject", subjects)


def model_aliases(model, tokenizer, requests: list[dict], count: int, samples: int, seed: int,
                  chat: bool) -> list[list[str]]:
    """Up to ``count`` other names for each request's subject, from the model as it is called (the caller turns the
    bypass off); none for a request without a subject in its prompt."""
    subjects = [r.get("subject") or "" for r in requests]
    drafts = sample_candidates(model, tokenizer, asking_texts(tokenizer, subjects, chat), samples, seed,
                               max_new_tokens=12)
    kept = []
    for request, subject, candidates in zip(requests, subjects, drafts):
        names = list(dict.fromkeys(n for n in (cleaned_alias(c, request) for c in candidates) if n))
        if not names or not subject or subject not in request["prompt"]:
            kept.append([])
            continue
        swapped = [request["prompt"].replace(subject, name) for name in names]
        agree = agreeing(model, tokenizer, request["prompt"], swapped)
        kept.append([name for name, ok in zip(names, agree) if ok][:count])
    return kept
