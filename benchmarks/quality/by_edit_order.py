"""Scores of a sequential run by when each edit was made: forgetting shows as early edits scoring lower.

    python benchmarks/quality/by_edit_order.py runs/seq1000-test [--parts 10]

Reads the run's ``results.jsonl`` (memoe-compare ``--protocol sequential``), splits its final
cases into ``--parts`` equal groups in edit order, and prints, per group, EasyEdit's scores
(``memoe_plugin.eval.metrics.aggregate``) and the mean edit time of its batches. Nothing is re-run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memoe_plugin.eval.compare.store import ResultStore
from memoe_plugin.eval.metrics import aggregate

COLUMNS = ("reliability", "generality", "locality", "same_subject")


def by_order(records: list[dict], parts: int) -> list[dict]:
    """One row per group of edits (in edit order) of the latest sequential attempt in ``records``."""
    attempts = [r["attempt"] for r in records if r.get("type") == "run_end"]
    if not attempts:
        raise SystemExit("no finished sequential run in this results file")
    attempt = attempts[-1]
    cases = sorted((r for r in records if r.get("type") == "case" and r.get("attempt") == attempt and r.get("final")),
                   key=lambda r: r["index"])
    chunk_of = {}   # edit index -> the batch it was made in
    for r in records:
        if r.get("type") == "chunk" and r.get("attempt") == attempt:
            chunk_of.update({i: r for i in range(*r["range"])})
    size = -(-len(cases) // parts)
    rows = []
    for lo in range(0, len(cases), size):
        group = cases[lo:lo + size]
        batches = {id(chunk_of[r["index"]]): chunk_of[r["index"]] for r in group if r["index"] in chunk_of}
        seconds = [b["edit_seconds"] for b in batches.values()]
        rows.append({"edits": f"{lo}-{lo + len(group) - 1}", **aggregate([r["metric"] for r in group]),
                     "batch_seconds": sum(seconds) / len(seconds) if seconds else None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a memoe-compare --out folder (or its results.jsonl)")
    parser.add_argument("--parts", type=int, default=10)
    args = parser.parse_args(argv)
    path = args.run / "results.jsonl" if args.run.is_dir() else args.run
    rows = by_order(ResultStore(path).records(), args.parts)
    print("| edits | " + " | ".join(COLUMNS) + " | s per batch |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for row in rows:
        cells = ["–" if row.get(c) is None else f"{row[c]:.1f}" for c in COLUMNS]
        seconds = "–" if row["batch_seconds"] is None else f"{row['batch_seconds']:.0f}"
        print(f"| {row['edits']} | " + " | ".join(cells) + f" | {seconds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
