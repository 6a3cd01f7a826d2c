"""MEMoE ablations through memoe-compare (EasyEdit's loaders, metrics and rollback), as a table and a plot.

    EASYEDIT_PATH=/path/to/EasyEdit MEMOE_DATA=../shared/data python benchmarks/quality/ablations.py \
        --data zsre-knowedit --split dev --num-edits 60 --groups extensions,experts --out runs/ablations

Each row is one ``memoe-compare`` batch-protocol run (chunks of 30, rolled back) from the
tuned file ``hparams/MEMoE/smollm2-135m.yaml`` with one setting changed, on the **dev**
split by default (tune on dev; report on test with ``benchmarks/quality/scope_table.py``).
``--seeds 0,1,2`` gives each row its mean and standard deviation over seeds.
Groups:
  extensions  each mechanism of the tuned file off in turn (key routing, the scope snap,
              the key scope, the guard), the preservation prompts and context prefixes on, and the
              paper-faithful file
  experts     num_experts 1, 2, 4, 8 (with key routing: edits spread over that many experts)
  layer       layer 12, 15, 18, 21, 24
  threshold   scope_threshold 0.3, 0.4, 0.5, 0.6
  routing     routing_input token / sentence / anchor with the paper's gate, and the
              anchor-led gate file
Rows already in <out>/ablations.jsonl are not run again (resume). Replay and the output memory
act in sequential editing only: ``dev_loop.py --sequential`` measures them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from memoe_plugin.assets import memoe_hparams

TUNED = memoe_hparams("smollm2-135m")
FILES = {"paper": memoe_hparams("smollm2-135m-paper"), "routing": memoe_hparams("smollm2-135m-routing")}

NO_VALUES = {"scope_values": False, "close_every": 0}   # the values need the snap at 1 and key routing
GATE = {"expert_routing": "gate", **NO_VALUES}
GROUPS = {
    "extensions": [("tuned", {}), ("key routing off (paper's gate)", GATE),
                   ("scope values off (the experts kept)", NO_VALUES),
                   ("scope snap off", {"scope_snap": 0.0, **NO_VALUES}),
                   ("anti-keys off", {"scope_anti_keys": "none"}),
                   ("anti-keys from the relation bank per edit", {"scope_anti_keys": "relation_bank"}),
                   ("stop keys off", {"scope_stop_keys": False}),
                   ("chat training off", {"chat": "off"}),
                   ("key scope off (guard only, gate)", {"scope_keys": False, "scope_snap": 0.0, **NO_VALUES,
                                                         "scope_anti_keys": "none", "scope_stop_keys": False,
                                                         **GATE}),
                   ("guard off (scope keys alone)", {"locality_guard": False}),
                   ("+ preservation prompts 4", {"preserve_prompts": 4}),
                   ("+ context prefixes 2", {"context_prefixes": 2}),
                   ("paper-faithful file", "paper")],
    "experts": [(f"num_experts={n}", {"num_experts": n}) for n in (1, 2, 4, 8)],
    "layer": [(f"layer={n}", {"layer": n}) for n in (12, 15, 18, 21, 24)],
    "threshold": [(f"scope_threshold={t}", {"scope_threshold": t}) for t in (0.3, 0.4, 0.5, 0.6)],
    "routing": [(f"gate, routing={m}", {"routing_input": m, **GATE}) for m in ("token", "sentence", "anchor")]
               + [("anchor-led gate (routing file)", "routing")],
}
COLUMNS = ("reliability", "generality", "locality", "same_subject", "average")


def setting_key(change) -> str:
    """One key per distinct configuration: overrides equal to the tuned file's values drop out."""
    if isinstance(change, str):
        return change
    import yaml
    tuned = yaml.safe_load(TUNED.read_text())
    return json.dumps({k: v for k, v in sorted(change.items()) if tuned.get(k) != v})


def run_one(args, label: str, change) -> dict:
    hparams = FILES[change] if isinstance(change, str) else TUNED
    out = Path(args.out) / "runs" / "".join(c if c.isalnum() else "_" for c in label)
    command = [sys.executable, "-m", "memoe_plugin.eval.compare", "--data", args.data, "--split", args.split,
               "--num-edits", str(args.num_edits), "--methods", "MEMoE", "--hparams", f"MEMoE={hparams}",
               "--out", str(out), "--no-progress", "--threads", str(args.threads)]
    if args.seeds:
        command += ["--seeds", args.seeds]
    if (out / "results.jsonl").exists():
        command.append("--resume")
    for key, value in ({} if isinstance(change, str) else change).items():
        command += ["--set", f"MEMoE.{key}={json.dumps(value)}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=os.environ)
    rows = json.loads((out / "summary.json").read_text())
    from memoe_plugin.eval.compare.report import combine_seeds
    (row,) = combine_seeds(rows)
    if row["status"] != "complete":
        raise RuntimeError(f"{label}: {row['status']}: {row['error']}")
    keep = [*COLUMNS, *(f"{c}_sd" for c in COLUMNS), "edit_seconds", "cases"]
    return {"data": args.data, "split": args.split, **{k: row.get(k) for k in keep}}


def fmt(row, key) -> str:
    value, sd = row.get(key), row.get(f"{key}_sd")
    if value is None:
        return "–"
    return f"{value:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({r["group"] for r in rows}, key=list(GROUPS).index)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        mine = [r for r in rows if r["group"] == group]
        xs = range(len(mine))
        for j, metric in enumerate(COLUMNS[:4]):
            ax.bar([x + (j - 1.5) * 0.2 for x in xs], [r.get(metric) or 0 for r in mine], width=0.2,
                   yerr=[r.get(f"{metric}_sd") or 0 for r in mine], label=metric.replace("_", "-"))
        ax.set_xticks(list(xs), [r["label"] for r in mine], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(group)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre-knowedit")
    parser.add_argument("--split", default="dev", choices=("dev", "test", "all"))
    parser.add_argument("--num-edits", type=int, default=60)
    parser.add_argument("--seeds", help="e.g. 0,1,2 (default: one run, file order)")
    parser.add_argument("--groups", default="extensions,experts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/ablations")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups.split(",") if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ablations.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    same = lambda r: (r["data"], r["split"], r.get("seeds")) == (args.data, args.split, args.seeds)  # noqa: E731
    done = {(r["group"], r["label"]) for r in rows if same(r)}
    by_setting = {r["setting"]: r for r in rows if same(r)}
    for group in args.groups.split(","):
        for label, change in GROUPS[group]:
            if (group, label) in done:
                continue
            key = setting_key(change)
            if key in by_setting:
                result = {k: v for k, v in by_setting[key].items() if k not in ("group", "label")}
                print(f"[{group}] {label}: same setting as an earlier row, reused", flush=True)
            else:
                print(f"[{group}] {label} ...", flush=True)
                try:
                    result = run_one(args, label, change)
                except (subprocess.CalledProcessError, RuntimeError) as err:
                    print(f"  failed: {err}", flush=True)
                    continue
            result.update(setting=key, seeds=args.seeds)
            row = {"group": group, "label": label, **result}
            by_setting[key] = row
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table = ["| group | setting | data | split | Rel. | Gen. | Loc. | Same-subj. | Avg. | edit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['group']} | {r['label']} | {r['data']} | {r['split']} | "
                     + " | ".join(fmt(r, k) for k in COLUMNS) + f" | {r['edit_seconds']:.0f} |")
    (out / "ablations.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    if rows:
        plot(rows, out / "ablations.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
