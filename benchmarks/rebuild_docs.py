"""Rebuild every table and plot of docs/compare.md and docs/results.md in one resumable command.

    EASYEDIT_PATH=/path/to/EasyEdit MEMOE_DATA=../shared/data python benchmarks/rebuild_docs.py \
        [--only scope-test,sequential] [--list] [--out runs/docs] [--threads 1]

Each step is one command (memoe-compare, memoe-tune, memoe-analyze or a benchmark script)
with its own output folder under ``--out``. A step whose folder already has results is
continued with ``--resume`` (memoe-compare skips finished chunks and methods, and continues a
sequential MEMoE run from its last checkpoint), so an interrupted rebuild loses at most the
chunk in progress. At the end it prints each step's wall time and, for comparison steps,
each method's edit time, and the total.

On the 2-core CPU machine of docs/results.md the whole rebuild takes days (the baselines'
sequential runs dominate); ``--only`` runs a subset. ``--list`` prints the steps and commands.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SEQUENTIAL_FILE = "memoe_plugin/assets/hparams/MEMoE/smollm2-135m-sequential.yaml"
BASELINES = "FT-L,FT-M,LoRA,ROME,MEMIT,GRACE,WISE,AlphaEdit,UltraEdit,EMMET,R-ROME,PMET,DEFER"
# Methods whose teacher-forced reliability does not see their edits (docs/compare.md): tuned by memoe-tune
# --criterion generation instead.
BLIND_TEACHER_FORCED = ("GRACE", "DEFER")
# (name, the document it feeds, command). memoe-compare and scope_table.py take --threads,
# --no-progress, --stats-text and --resume; memoe-tune passes them on to its trials (and resumes
# them itself); ablations.py takes --threads and resumes from its own log.
STEPS = [
    ("tune", "compare.md: tuned baselines (then --install, or --hparams-dir <out>/tune/tuned)",
     ["memoe-tune", "--methods", ",".join(m for m in BASELINES.split(",") if m not in BLIND_TEACHER_FORCED),
      "--trials", "12", "--data", "zsre-knowedit", "--num-edits", "30"]),
    ("tune-generation", "compare.md: GRACE and DEFER tuned by greedy exact match (then --install)",
     ["memoe-tune", "--methods", ",".join(BLIND_TEACHER_FORCED), "--criterion", "generation", "--trials", "12",
      "--data", "zsre-knowedit", "--num-edits", "30"]),
    ("compare-30", "compare.md: 30 ZsRE + 30 CounterFact test records, every method, generation, probes",
     ["memoe-compare", "--data", "zsre-knowedit,counterfact", "--split", "test", "--num-edits", "30",
      "--methods", "MEMoE," + BASELINES, "--generation", "--probes", "20"]),
    ("cf-subject", "compare.md: same-subject locality on 30 KnowEdit wiki_counterfact test records",
     ["memoe-compare", "--data", "counterfact-knowedit", "--split", "test", "--num-edits", "30",
      "--methods", "MEMoE," + BASELINES]),
    ("scope-dev", "results.md: quality table on dev", ["python", "benchmarks/quality/scope_table.py",
                                                        "--split", "dev", "--num-edits", "120"]),
    ("scope-test", "results.md: quality table on test, 3 seeds", ["python", "benchmarks/quality/scope_table.py",
                                                                  "--split", "test", "--num-edits", "300"]),
    ("ablations", "results.md: each extension on and off (dev)", ["python", "benchmarks/quality/ablations.py",
                                                                  "--split", "dev", "--num-edits", "60",
                                                                  "--groups", "extensions,experts,threshold"]),
    ("table4", "compare.md: paper Table 4, batch sizes 10/100/1000",
     ["memoe-compare", "--data", "zsre-knowedit", "--split", "test", "--num-edits", "1000",
      "--batch-size", "10,100,1000", "--methods", "MEMoE,FT-M,MEMIT,AlphaEdit,UltraEdit"]),
    ("general", "compare.md: general ability after 10, 30, 100 edits (paper Figure 3)",
     ["memoe-compare", "--data", "zsre-knowedit", "--split", "test", "--num-edits", "100",
      "--batch-size", "10,30,100", "--methods", "MEMoE,MEMIT,FT-M,AlphaEdit", "--probes", "100"]),
    ("tune-sequential", "results.md: baselines tuned for the sequential protocol (then --install)",
     ["memoe-tune", "--methods", "FT-M,MEMIT,GRACE,WISE,AlphaEdit,UltraEdit", "--trials", "6", "--protocol",
      "sequential", "--data", "zsre-knowedit", "--num-edits", "100"]),
    ("sequential", "results.md: 1000 sequential ZsRE edits, MEMoE and baselines",
     ["memoe-compare", "--data", "zsre-knowedit", "--split", "test", "--num-edits", "1000", "--protocol",
      "sequential", "--batch-size", "10", "--methods", "MEMoE,FT-M,MEMIT,GRACE,WISE,AlphaEdit,UltraEdit",
      "--hparams", f"MEMoE={SEQUENTIAL_FILE}"]),
    ("sequential-cf-100", "results.md: 100 sequential CounterFact edits, MEMoE against MEMIT, GRACE and AlphaEdit",
     ["memoe-compare", "--data", "counterfact", "--split", "test", "--num-edits", "100", "--protocol",
      "sequential", "--batch-size", "10", "--methods", "MEMoE,MEMIT,GRACE,AlphaEdit",
      "--hparams", f"MEMoE={SEQUENTIAL_FILE}"]),
    ("sequential-cf", "results.md: 1000 sequential CounterFact edits",
     ["memoe-compare", "--data", "counterfact", "--split", "test", "--num-edits", "1000", "--protocol",
      "sequential", "--batch-size", "10", "--methods", "MEMoE,FT-M,MEMIT,GRACE,WISE,AlphaEdit,UltraEdit",
      "--hparams", f"MEMoE={SEQUENTIAL_FILE}"]),
]


def command_for(step: tuple, out: Path, threads: int, stats_text: str | None) -> list[str]:
    name, _, argv = step
    folder = out / name
    program, *rest = argv
    command = [sys.executable, *rest] if program == "python" else [program, *rest]
    command += ["--out", str(folder), "--threads", str(threads)]
    if "ablations.py" in " ".join(argv):
        return command
    command.append("--no-progress")
    if stats_text:
        command += ["--stats-text", stats_text]
    if program != "memoe-tune" and (folder / "results.jsonl").exists():
        command.append("--resume")
    return command


def method_times(folder: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    for summary in folder.rglob("summary.json"):
        for row in json.loads(summary.read_text()):
            if row.get("edit_seconds"):
                times[row["method"]] = times.get(row["method"], 0.0) + row["edit_seconds"]
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/docs")
    parser.add_argument("--only", help="comma-separated step names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats-text", help="local text for ROME/MEMIT/AlphaEdit statistics (memoe-compare --stats-text)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    steps = STEPS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = set(wanted) - {s[0] for s in STEPS}
        if unknown:
            parser.error(f"unknown step(s) {sorted(unknown)}; steps: {', '.join(s[0] for s in STEPS)}")
        steps = [s for s in STEPS if s[0] in wanted]
    out = Path(args.out)
    if args.list:
        for step in steps:
            print(f"{step[0]:16s} {step[1]}\n    {shlex.join(command_for(step, out, args.threads, args.stats_text))}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    timings, failed = [], []
    start = time.perf_counter()
    for step in steps:
        command = command_for(step, out, args.threads, args.stats_text)
        print(f"[rebuild] {step[0]}: {shlex.join(command)}", flush=True)
        t = time.perf_counter()
        code = subprocess.run(command).returncode
        timings.append((step[0], time.perf_counter() - t, code))
        if code != 0:
            failed.append(step[0])
    print("\n| step | wall s | status | edit s per method |\n|---|---|---|---|")
    for name, seconds, code in timings:
        per_method = ", ".join(f"{m} {s:.0f}" for m, s in sorted(method_times(out / name).items()))
        print(f"| {name} | {seconds:.0f} | {'ok' if code == 0 else f'exit {code}'} | {per_method} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
