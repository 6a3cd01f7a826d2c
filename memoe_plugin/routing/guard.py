"""The locality guard: the bypass stays silent where no edited knowledge is in sight (an extension)."""
from __future__ import annotations

import re

from .lru import LRU


class LocalityGuard:
    """Keeps the bypass silent where no edited knowledge is in sight (an extension, off by default).

    ``keys`` are the knowledge anchors of the edited facts: the entities of each
    edit prompt and its ``subject`` when given. Position ``t`` is *active* when
    the text of tokens ``0..t`` contains one of them as a whole word (case
    insensitive); elsewhere the bypass adds nothing, so inputs about other
    knowledge get exactly the base model's output. Causal, like the anchors.
    """

    def __init__(self, tokenizer, cache_size: int = 4096):
        self.tokenizer = tokenizer
        self.keys: set[str] = set()
        self._pattern = None
        self._cache = LRU(cache_size)

    def add(self, keys) -> None:
        new = {k.strip().lower() for k in keys if k and k.strip()} - self.keys
        if new:
            self.keys |= new
            longest_first = sorted(self.keys, key=len, reverse=True)
            self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, longest_first)) + r")(?!\w)")
            self._cache.clear()

    def active(self, ids) -> list[bool]:
        """For each position of one sequence of real tokens: is edited knowledge in the prefix?"""
        ids = tuple(ids)
        cached = self._cache.lookup(ids)
        if cached is not None:
            return cached
        if self._pattern is None:
            return [False] * len(ids)
        parent = self._cache.lookup(ids[:-1]) if len(ids) > 1 else None
        if parent is not None:
            flags = parent + [parent[-1] or self._matches(ids)]
        else:
            flags, seen = [], False
            for end in range(1, len(ids) + 1):   # once a key is in the prefix it stays there
                seen = seen or self._matches(ids[:end])
                flags.append(seen)
        return self._cache.store(ids, flags)

    def _matches(self, ids) -> bool:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True).lower()
        return self._pattern.search(text) is not None
