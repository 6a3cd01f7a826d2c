"""MEMoE ablations through EasyEdit (paper Fig. 4 and Table 5), as tables and a plot.

    EASYEDIT_PATH=/path/to/EasyEdit python benchmarks/quality/ablations.py --data zsre --num-edits 30 \
        --groups experts,layer,topk,routing,extensions --out runs/ablations

Each row is one EasyEdit batch_edit run (batch = all edits, rolled back), from the
tuned CPU file ``hparams/MEMoE/smollm2-135m.yaml`` with one setting changed.
Groups:
  experts     num_experts 1..6
  layer       layer 6, 9, 12, 15, 18, 21
  topk        top-1, top-2, top-3, soft merging (top_k = num_experts)
  routing     routing_input token / sentence / anchor, and the anchor-led gate file
  extensions  the tuned file, locality guard off, the paper-faithful file (context prefixes
              are in docs/results.md's tuning table; replay and the output memory act in
              sequential editing only)
A setting equal to the tuned file (layer=12, num_experts=4, top-1, routing=anchor, tuned)
is run once and its row reused.
Rows already in <out>/ablations.jsonl are not run again (resume).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from memoe_plugin.assets import memoe_hparams

HERE = Path(__file__).resolve().parent
TUNED = memoe_hparams("smollm2-135m")
PAPER = memoe_hparams("smollm2-135m-paper")
ROUTING = memoe_hparams("smollm2-135m-routing")
FILES = {"paper": PAPER, "routing": ROUTING}

GROUPS = {
    "experts": [(f"num_experts={n}", {"num_experts": n}) for n in range(1, 7)],
    "layer": [(f"layer={n}", {"layer": n}) for n in (6, 9, 12, 15, 18, 21)],
    "topk": [("top-1", {"top_k": 1}), ("top-2", {"top_k": 2}), ("top-3", {"top_k": 3}),
             ("soft (top-4 of 4)", {"top_k": 4})],
    "routing": [(f"routing={m}", {"routing_input": m}) for m in ("token", "sentence", "anchor")]
               + [("anchor-led gate (routing file)", "routing")],
    "extensions": [("tuned", {}), ("locality_guard off", {"locality_guard": False}),
                   ("paper-faithful file", "paper")],
}


def setting_key(change) -> str:
    """One key per distinct configuration: overrides equal to the tuned file's values drop out."""
    if isinstance(change, str):
        return change
    import yaml
    tuned = yaml.safe_load(TUNED.read_text())
    return json.dumps({k: v for k, v in sorted(change.items()) if tuned.get(k) != v})


def run_one(args, label: str, change) -> dict:
    hparams = FILES.get(change, TUNED) if isinstance(change, str) else TUNED
    overrides = [] if isinstance(change, str) else [f"{k}={v}" for k, v in change.items()]
    out = Path(args.out) / f"{label.replace(' ', '_').replace('=', '-')}.json"
    command = [sys.executable, str(HERE / "easyedit_batch.py"), "--data", args.data,
               "--num-edits", str(args.num_edits), "--batch-size", str(args.num_edits),
               "--hparams", str(hparams), "--json", str(out)]
    if overrides:
        command += ["--set", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({r["group"] for r in rows}, key=list(GROUPS).index)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, group in zip(axes[0], groups):
        mine = [r for r in rows if r["group"] == group]
        xs = range(len(mine))
        for offset, metric in zip((-0.27, 0, 0.27), ("reliability", "generality", "locality")):
            ax.bar([x + offset for x in xs], [r[metric] for r in mine], width=0.27, label=metric)
        ax.set_xticks(list(xs), [r["label"] for r in mine], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(group)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre", choices=("zsre", "counterfact"))
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ablations.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["group"], r["label"], r["data"]) for r in rows}
    by_setting = {r["setting"]: r for r in rows if r.get("setting") and r["data"] == args.data}
    for group in args.groups.split(","):
        for label, change in GROUPS[group]:
            if (group, label, args.data) in done:
                continue
            key = setting_key(change)
            if key in by_setting:
                result = {k: v for k, v in by_setting[key].items() if k not in ("group", "label")}
                print(f"[{group}] {label}: same setting as an earlier row, reused", flush=True)
            else:
                print(f"[{group}] {label} ...", flush=True)
                try:
                    result = run_one(args, label, change)
                except subprocess.CalledProcessError as err:
                    print(f"  failed: {err}", flush=True)
                    continue
            result["setting"] = key
            row = {"group": group, "label": label, **result}
            by_setting[key] = row
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table = ["| group | setting | data | Rel. | Gen. | Loc. | Avg. | edit s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['group']} | {r['label']} | {r['data']} | {r['reliability']:.1f} | {r['generality']:.1f} "
                     f"| {r['locality']:.1f} | {r['average']:.1f} | {r['edit_seconds_total']:.0f} |")
    (out / "ablations.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    if rows:
        plot(rows, out / "ablations.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
