"""routing/lru.py: the bounded cache of the anchors and the guard."""
from memoe_plugin.routing.lru import LRU


def test_least_recently_used_goes_first_and_capacity_zero_keeps_nothing():
    cache = LRU(2)
    cache.store("a", 1), cache.store("b", 2)
    assert cache.lookup("a") == 1                 # a is now the most recent
    cache.store("c", 3)
    assert list(cache) == ["a", "c"] and cache.lookup("b") is None
    assert cache.store("d", 4) == 4 and list(cache) == ["c", "d"]
    off = LRU(0)
    assert off.store("a", 1) == 1 and len(off) == 0
