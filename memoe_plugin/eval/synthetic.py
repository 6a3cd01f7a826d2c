"""Synthetic facts for load tests (issue: scale): invented subjects that no model or data file knows.

A load test measures what many edits cost (time, memory, bytes, inference overhead), not what they teach;
the benchmarks say so wherever they use these. Every subject is distinct (``invented_subject`` is a bijection
onto made-up two-word names), the relations are the project's relation bank, the answers a fixed list.
"""
from __future__ import annotations

import random

SYLLABLES = ("vel", "mar", "quis", "tad", "or", "an", "tey", "bras", "ka", "mi", "rel", "do", "van", "il",
             "sa", "kort", "pen", "na", "sab", "re", "ut", "hel", "zo", "fin")
ANSWERS = ("Lisbon", "Oslo", "chemistry", "violin", "Toyota", "Spanish", "surgeon", "Kenya", "jazz", "Nintendo")
NAMES = len(SYLLABLES) ** 6          # distinct subjects


def invented_subject(i: int) -> str:
    """The ``i``-th invented name (0 <= i < NAMES), three syllables each for first name and surname; neighbouring
    ``i`` get unlike names."""
    if not 0 <= i < NAMES:
        raise ValueError(f"subject index {i} outside 0..{NAMES - 1}")
    parts, i = [], (i * 7919 + 104729) % NAMES   # 7919 is prime to 24: a bijection that scatters neighbours
    for _ in range(6):
        i, r = divmod(i, len(SYLLABLES))
        parts.append(SYLLABLES[r])
    return f"{''.join(parts[:3]).capitalize()} {''.join(parts[3:]).capitalize()}"


def synthetic_facts(count: int, seed: int = 0, first: int = 0) -> list[dict]:
    """``count`` edit requests: subject ``invented_subject(first + i)``, a relation of the bank drawn with
    ``seed``, an answer from :data:`ANSWERS`."""
    from ..routing.relations import CLOZE, RELATIONS
    rng, labels = random.Random(seed), [names[0] for names in RELATIONS.values()]
    out = []
    for i in range(first, first + count):
        subject = invented_subject(i)
        out.append({"prompt": CLOZE.format(label=rng.choice(labels), subject=subject),
                    "target_new": rng.choice(ANSWERS), "subject": subject})
    return out
