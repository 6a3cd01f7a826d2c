"""A small bounded mapping, the cache of the anchors and of the guard."""
from __future__ import annotations

from collections import OrderedDict


class LRU(OrderedDict):
    """A small bounded mapping: least recently used entries go first."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key, value):
        if self.capacity <= 0:
            return value
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value
