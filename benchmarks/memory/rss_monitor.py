"""Run a command and sample its resident memory (RSS) while it runs.

    python benchmarks/memory/rss_monitor.py [--every 5] [--csv runs/rss.csv] -- <command ...>

Samples the RSS of the command's process tree (from /proc, Linux only) every
``--every`` seconds, and prints the peak, the RSS at the start and the end, and the
least-squares slope of RSS over time in the second half of the run (where a leak in a
long sequential run would show and start-up would not). Used for the issue-6 memory
measures:

    python benchmarks/memory/rss_monitor.py --csv runs/rss-batch30.csv -- \
        python benchmarks/quality/easyedit_batch.py --data zsre --num-edits 30 --batch-size 30
    python benchmarks/memory/rss_monitor.py --csv runs/rss-seq1000.csv -- \
        memoe-compare --data zsre --protocol sequential --num-edits 1000 --methods MEMoE ...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(root: int) -> int:
    """RSS of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(pid, []))
    return total


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var / 2**20 * 3600 if var else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--csv", default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start = time.monotonic()
    process = subprocess.Popen(command)
    samples: list[tuple[float, int]] = []
    while process.poll() is None:
        samples.append((time.monotonic() - start, tree_rss_bytes(process.pid)))
        time.sleep(args.every)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        Path(args.csv).write_text("seconds,rss_mb\n" + "".join(f"{t:.1f},{r / 2**20:.1f}\n" for t, r in samples))
    if samples:
        peak = max(r for _, r in samples)
        second_half = [s for s in samples if s[0] >= samples[-1][0] / 2]
        print(f"[rss] {len(samples)} samples over {samples[-1][0]:.0f} s: first {samples[0][1] / 2**20:.0f} MB, "
              f"peak {peak / 2**20:.0f} MB, last {samples[-1][1] / 2**20:.0f} MB, slope over the second half "
              f"{slope_mb_per_hour(second_half):+.1f} MB/h; exit {process.returncode}")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
