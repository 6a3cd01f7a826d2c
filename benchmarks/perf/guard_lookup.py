"""Cost of the locality guard's anchor lookup as the number of edited anchors grows.

    python benchmarks/perf/guard_lookup.py [--anchors 1000,10000,100000] [--texts 200]

The guard decodes each prefix and looks for every edited anchor in it as a whole word. It did that with one
regular expression alternating all anchors, which tries each anchor at each position; ``AnchorIndex`` looks at a
position only the anchors that begin with the word there. Anchors are made-up two- and three-word names (from a
fixed vocabulary, seeded), texts are 230-character sentences of the same words, a few of which name an anchor.
Both lookups run on the same texts in one process and must agree on every text; the script prints
milliseconds per text for each. Compilation/indexing time is printed apart (it is paid once per set of keys).
"""
from __future__ import annotations

import argparse
import random
import re
import time

from memoe_plugin.routing.guard import AnchorIndex


def vocabulary(rng, n=3000):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", default="1000,10000,100000")
    parser.add_argument("--texts", type=int, default=200)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    words = vocabulary(rng)
    print(f"{'anchors':>8s} {'regex build s':>13s} {'index build s':>13s} {'regex ms/text':>13s} "
          f"{'index ms/text':>13s} {'texts naming one':>16s}")
    for n in map(int, args.anchors.split(",")):
        anchors = {" ".join(rng.choice(words) for _ in range(rng.randint(2, 3))) for _ in range(n)}
        pool = sorted(anchors)
        texts = []
        for _ in range(args.texts):
            parts = []
            while len(" ".join(parts)) < 230:
                parts.append(rng.choice(pool) if rng.random() < 0.05 else rng.choice(words))
            texts.append(" ".join(parts)[:230])
        start = time.perf_counter()
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(anchors, key=len, reverse=True)))
                             + r")(?!\w)")
        regex_build = time.perf_counter() - start
        start = time.perf_counter()
        index = AnchorIndex(anchors)
        index_build = time.perf_counter() - start
        start = time.perf_counter()
        by_regex = [frozenset(m.group(0) for m in pattern.finditer(t)) for t in texts]
        regex_ms = (time.perf_counter() - start) * 1000 / len(texts)
        start = time.perf_counter()
        by_index = [index.find(t) for t in texts]
        index_ms = (time.perf_counter() - start) * 1000 / len(texts)
        if by_regex != by_index:
            raise SystemExit(f"the two lookups disagree at {n} anchors")
        print(f"{n:8d} {regex_build:13.2f} {index_build:13.2f} {regex_ms:13.3f} {index_ms:13.3f} "
              f"{sum(bool(f) for f in by_index):16d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
