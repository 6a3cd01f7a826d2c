"""The summary's charts (matplotlib, the ``[compare]`` extra): scores per method, and the paper's Figure 3."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

from .report import _groups, combine_seeds


def plot_general_ability(path: Path, rows: list[dict]) -> Optional[Path]:
    """The paper's Figure 3: per task, accuracy after editing against the number of edits, one line per
    method, with the 95 % interval, and the unedited model's accuracy dashed."""
    probed = [r for r in rows if r.get("probes")]
    if not probed:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(task for r in probed for task in r["probes"]))
    columns = min(4, len(tasks))
    fig, axes = plt.subplots(math.ceil(len(tasks) / columns), columns, figsize=(3.6 * columns,
                                                                              3.0 * math.ceil(len(tasks) / columns)),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in probed))
    for ax, task in zip(axes.flat, tasks):
        for method in methods:
            mine = sorted(((r["batch_size"] if r["protocol"] == "batch" else r["num_edits"], r["probes"][task])
                           for r in probed if r["method"] == method and task in r["probes"]), key=lambda x: x[0])
            if not mine:
                continue
            xs = [x for x, _ in mine]
            ys = [c["after"] for _, c in mine]
            errors = [c["high"] - c["change"] for _, c in mine]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        before = next(r["probes"][task]["before"] for r in probed if task in r["probes"])
        ax.axhline(before, linestyle="--", color="grey", linewidth=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("edits", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        if len({x for r in probed for x in [r["batch_size"]]}) > 2:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=min(6, len(labels)), fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_summary(path: Path, rows: list[dict]) -> Optional[Path]:
    """Grouped bar chart: one panel per (protocol group, dataset), bars Rel/Gen/Loc/Avg per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[memoe-compare] matplotlib is not installed: no summary.png (pip install matplotlib)",
              file=sys.stderr)
        return None
    panels = []
    for (protocol, bs, n, split), group in _groups(combine_seeds(rows)).items():
        for d in sorted({r["dataset"] for r in group}, key=lambda d: (d != "zsre", d)):
            panels.append((f"{d}, {protocol} (bs {bs}, {n} edits, {split})", [r for r in group if r["dataset"] == d]))
    if not panels:
        return None
    keys = ("reliability", "generality", "locality", "same_subject", "average")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.3 * max(len(p[1]) for p in panels) + 2),
                                                     3.4 * len(panels)), squeeze=False)
    width = 0.16
    for ax, (title, group) in zip(axes[:, 0], panels):
        for j, key in enumerate(keys):
            values = [r[key] if r[key] is not None else 0.0 for r in group]
            ax.bar([i + (j - 2) * width for i in range(len(group))], values, width,
                   label=key.replace("_", "-").capitalize())
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([r["method"] if r["status"] == "complete" else f"{r['method']}\n({r['status']})"
                            for r in group], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=5, fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.06 / len(panels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
