"""Edit time of MEMoE against FT-L (and GRACE, MEMIT) for the same edits, in one run, through EasyEdit.

    EASYEDIT_PATH=/path/to/EasyEdit python benchmarks/perf/edit_time.py [--data zsre] [--num-edits 30] \
        [--methods MEMoE,FT-L] [--threads 1] [--out runs/edit-time]

Runs ``memoe-compare`` (batch protocol, one chunk of all the edits) for the methods,
one after another in this process, and prints each method's edit time (EasyEdit's
``time``: seconds inside the apply function, summed over the chunk) and its ratio to
FT-L's. Scores are printed too, so a faster setting that edits worse shows up. Add
``GRACE,MEMIT`` to ``--methods`` for those ratios (MEMIT needs ``--stats-text``, see
docs/compare.md). The issue-6 target is MEMoE / FT-L <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre", choices=("zsre", "counterfact"))
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--methods", default="MEMoE,FT-L")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats-text", default=None)
    parser.add_argument("--set", action="append", default=[], help="METHOD.key=value, as for memoe-compare")
    parser.add_argument("--out", default="runs/edit-time")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if "FT-L" not in methods:
        parser.error("--methods must include FT-L, the reference")

    from memoe_plugin.eval import compare
    out = Path(args.out)
    argv = ["--data", args.data, "--num-edits", str(args.num_edits), "--batch-size", str(args.num_edits),
            "--methods", ",".join(methods), "--threads", str(args.threads), "--out", str(out), "--no-progress"]
    if (out / "results.jsonl").exists():
        argv.append("--resume")
    if args.stats_text:
        argv += ["--stats-text", args.stats_text]
    for item in args.set:
        argv += ["--set", item]
    status = compare.main(argv)
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())
            if r["dataset"] == args.data and r["num_edits"] == args.num_edits and r["protocol"] == "batch"}
    reference = rows["FT-L"]["edit_seconds"]
    print(f"\n{args.num_edits} {args.data} edits, one batch, {args.threads} thread(s)")
    print(f"{'method':8s} {'edit s':>8s} {'/ FT-L':>7s}   Rel.   Gen.   Loc.")
    for method in methods:
        row = rows.get(method)
        if row is None or row.get("status") != "complete":
            print(f"{method:8s} {'error' if row is None else row.get('error', '')[:60]}")
            continue
        print(f"{method:8s} {row['edit_seconds']:8.1f} {row['edit_seconds'] / reference:7.2f}  "
              f"{row['reliability']:5.1f}  {row['generality']:5.1f}  {row['locality']:5.1f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
