"""The summary of a results file: one row per run, as Markdown, CSV, JSON and a bar chart."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import statistics

from ..metrics import GENERATION_SCORES, PORTABILITY_PARTS, SCORES, aggregate
from .methods import METHODS
from .plan import chunk_ranges, parse_key
from .store import _jsonable

# CounterFact's generality split by kind of rephrasing (metrics.is_paraphrase_prompt), beside its Gen. column
SPLIT_LABELS = {"generality_paraphrase": "Gen. para.", "generality_other": "Gen. other"}
PORTABILITY_LABELS = {"portability_aliases": "Port. alias", "portability_reasoning": "Port. reason",
                      "portability_logical": "Port. logic"}


def summarise(records: list[dict]) -> list[dict]:
    """One row per run key, from the results.jsonl records (the latest attempt wins where attempts overlap)."""
    runs: dict[str, dict] = {}
    for rec in records:
        key = rec.get("run")
        if key is None:
            continue
        row = runs.setdefault(key, {"run": key, "starts": [], "chunks": {}, "cases": {}, "errors": [],
                                    "complete_attempts": set(), "restore": None, "steps": {}})
        kind = rec["type"]
        if kind == "run_start":
            row["starts"].append(rec)
        elif kind == "run_info":
            row["info"] = rec
        elif kind == "chunk":
            row["chunks"].setdefault(rec["attempt"], {})[rec["chunk"]] = rec
        elif kind == "case":
            row["cases"].setdefault(rec["attempt"], []).append(rec)
        elif kind == "error":
            row["errors"].append(rec)
        elif kind == "run_end" and rec.get("status") == "complete":
            row["complete_attempts"].add(rec["attempt"])
        elif kind == "restore":
            row["restore"] = rec
        elif kind == "probe":
            row.setdefault("probes", {}).setdefault(rec["attempt"], []).append(rec)
        elif kind == "fluency":
            row.setdefault("fluency", {}).setdefault(rec["attempt"], []).append(rec)
    return [_summarise_run(row) for row in runs.values()]


def _summarise_run(row: dict) -> dict:
    start = row.get("info", {})
    out = {**parse_key(row["run"]), "note": start.get("note", ""), "batchable": start.get("batchable"),
           "hparams_origin": (start.get("hparams") or {}).get("origin", ""),
           "skipped_records": start.get("skipped_records", 0)}
    if out["protocol"] == "batch":
        chosen: dict[int, dict] = {}        # chunk -> its latest chunk record
        for attempt, chunks in row["chunks"].items():
            for k, rec in chunks.items():
                chosen[k] = rec
        cases = [c for attempt, cs in row["cases"].items() for c in cs
                 if c["chunk"] in chosen and chosen[c["chunk"]]["attempt"] == attempt and c.get("final", True)]
        chunk_recs = list(chosen.values())
        rollback = [rec.get("rollback_exact") for rec in chunk_recs]
        n_chunks = len(chunk_ranges(out["num_edits"], out["batch_size"])) if out["num_edits"] else None
        complete = n_chunks is not None and len(chosen) >= n_chunks
    else:
        attempts = [a for a in row["complete_attempts"]]
        attempt = attempts[-1] if attempts else None
        cases = [c for c in row["cases"].get(attempt, []) if c.get("final")]
        steps = {}
        for c in row["cases"].get(attempt, []):
            if not c.get("final"):
                steps.setdefault(c["step"], []).append(c)
        out["steps"] = {k: aggregate([c["metric"] for c in v]) for k, v in sorted(steps.items())}
        chunk_recs = list(row["chunks"].get(attempt, {}).values())
        rollback = [row["restore"].get("rollback_exact")] if row["restore"] and attempt else []
        complete = attempt is not None
    cases.sort(key=lambda c: c["index"])
    out.update(aggregate([c["metric"] for c in cases]))
    out["probes"] = _probe_changes(row.get("probes", {}))
    out["fluency"] = _fluency_change(row.get("fluency", {}))
    out["cases"] = len(cases)
    out["portability_unscored"] = sum(1 for c in cases if c["metric"].get("post", {}).get("portability_unscored"))
    out["edit_seconds"] = sum(float(r.get("edit_seconds") or 0.0) for r in chunk_recs) if chunk_recs else None
    out["seconds_per_edit"] = (out["edit_seconds"] / len(cases)) if cases and out["edit_seconds"] else None
    if not rollback or any(r is None for r in rollback):
        out["rollback"] = "n/a" if not rollback else "not checked"
    else:
        out["rollback"] = "exact" if all(rollback) else "DIFFERS"
    last_error = row["errors"][-1] if row["errors"] else None
    if complete:
        out["status"] = "complete"
    elif last_error is not None and last_error.get("kind") == "unavailable":
        out["status"] = "unavailable offline"
    elif last_error is not None:
        out["status"] = "error"
    else:
        out["status"] = "partial"
    out["error"] = "" if complete or last_error is None else last_error["error"]
    return out


def _before_after(attempts: dict) -> Optional[tuple[dict, dict]]:
    """The "before" and "after" records of the newest attempt that has both (probes and fluency alike)."""
    for attempt in reversed(list(attempts)):
        before = next((r for r in attempts[attempt] if r["stage"] == "before"), None)
        after = next((r for r in attempts[attempt] if r["stage"] == "after"), None)
        if before is not None and after is not None:
            return before, after
    return None


def _probe_changes(attempts: dict) -> dict:
    """Per probe task (and ``all`` tasks pooled), the paired change after the first probed chunk."""
    from ..probes import paired_change
    pair = _before_after(attempts)
    if pair is None:
        return {}
    before, after = pair
    tasks = [task for task in before["tasks"] if task in after["tasks"]]
    changes = {task: paired_change(before["tasks"][task], after["tasks"][task]) for task in tasks}
    changes["all"] = paired_change([x for task in tasks for x in before["tasks"][task]],
                                   [x for task in tasks for x in after["tasks"][task]])
    return changes


def _fluency_change(attempts: dict) -> dict:
    """Fluency before the edits and after the first scored chunk."""
    from ..fluency import fluency_change
    pair = _before_after(attempts)
    return {} if pair is None else fluency_change(*pair)


def combine_seeds(rows: list[dict]) -> list[dict]:
    """One row per run that differs only by seed: each score the mean over the seeds, with its
    standard deviation (``<score>_sd``, None for one seed) and the seeds' own values (``<score>_seeds``)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["dataset"], row["protocol"], row["batch_size"], row["num_edits"], row["method"], row["split"])
        groups.setdefault(key, []).append(row)
    out = []
    for group in groups.values():
        if len(group) == 1 and group[0]["seed"] is None:
            out.append(group[0])
            continue
        group.sort(key=lambda r: (r["seed"] is None, r["seed"]))
        row = dict(group[0], seeds=[r["seed"] for r in group], cases=sum(r["cases"] for r in group),
                   portability_unscored=sum(r.get("portability_unscored", 0) for r in group))
        for key in SCORES + tuple(GENERATION_SCORES) + tuple(SPLIT_LABELS) + tuple(PORTABILITY_PARTS) + (
                "average", "portability", "edit_seconds", "seconds_per_edit"):
            values = [r.get(key) for r in group if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            row[f"{key}_seeds"] = [r.get(key) for r in group]
        bad = [r for r in group if r["status"] != "complete"]
        row["status"] = bad[0]["status"] if bad else "complete"
        row["error"] = "; ".join(f"seed {r['seed']}: {r['error']}" for r in group if r["error"])
        rollbacks = {r["rollback"] for r in group}
        row["rollback"] = rollbacks.pop() if len(rollbacks) == 1 else "DIFFERS" if "DIFFERS" in rollbacks else "mixed"
        out.append(row)
    return out


def _fmt(value, digits=1, sd=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


CSV_FIELDS = ("dataset", "split", "seed", "protocol", "batch_size", "num_edits", "method", "status", "cases",
              "reliability", "generality", "locality", "same_subject", "average", "portability", *PORTABILITY_PARTS,
              *GENERATION_SCORES,
              *SPLIT_LABELS,
              "edit_seconds",
              "seconds_per_edit", "rollback", "skipped_records", "portability_unscored", "note", "hparams_origin", "error")


def write_summary(out_dir: Path, rows: list[dict], method_order: Optional[list[str]] = None,
                  commands: Optional[list[str]] = None) -> dict[str, Path]:
    """summary.md / .csv / .json / .png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    order = {m: i for i, m in enumerate(method_order or list(METHODS))}
    rows = sorted(rows, key=lambda r: (r["protocol"], r["batch_size"] or 0, r["num_edits"] or 0,
                                       order.get(r["method"], 99), r["method"], r["dataset"]))
    paths = {"json": out_dir / "summary.json", "csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    paths["json"].write_text(json.dumps(rows, indent=2, default=_jsonable))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    paths["md"].write_text(markdown_summary(rows, commands))
    from .plots import plot_general_ability, plot_summary
    png = plot_summary(out_dir / "summary.png", rows)
    if png:
        paths["png"] = png
        general = plot_general_ability(out_dir / "general_ability.png", rows)
        if general:
            paths["general_png"] = general
    probed = [r for r in rows if r.get("probes")]
    if probed:
        paths["general_csv"] = out_dir / "general_ability.csv"
        with paths["general_csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dataset", "protocol", "batch_size", "num_edits", "method", "split", "seed", "task",
                             "before", "after", "change", "low", "high", "items"])
            for r in probed:
                for task, c in r["probes"].items():
                    writer.writerow([r["dataset"], r["protocol"], r["batch_size"], r["num_edits"], r["method"],
                                     r["split"], r["seed"], task] + [round(c[k], 3) for k in
                                                                     ("before", "after", "change", "low", "high")]
                                    + [c["items"]])
    return paths


def _groups(rows):
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["batch_size"], row["num_edits"], row.get("split", "all")),
                          []).append(row)
    return groups


def markdown_summary(rows: list[dict], commands: Optional[list[str]] = None) -> str:
    lines = ["# memoe-compare results", ""]
    if commands:
        lines += ["Commands:", ""] + [f"    {c}" for c in commands] + [""]
    lines += ["Reliability = EasyEdit `rewrite_acc`, Generality = `rephrase_acc`, Locality = `neighborhood_acc` "
              "(prompts about other subjects), Same-subj. = `Relation_Specificity_acc` (KnowEdit: other facts "
              "about the edited subject), all post-edit, in %, mean over edits; Average = the mean of the "
              "columns a dataset scores (Rel., Gen., Loc., Same-subj.). Port. = EasyEdit `portability_acc` "
              "(KnowEdit's Reasoning / Subject_Aliasing / Logical_Generalization prompts), beside the average, and each "
              "part alone (Port. alias / reason / logic, over the edits that have that part). "
              "EM and F1 (with --generation) = greedy generation of the answer from the edit prompt (Gen. EM/F1: "
              "from the rephrasing), as long as the target, scored by exact match and token F1. With several seeds, a cell is the mean over seeds ± their standard "
              "deviation; each seed draws its own records from the split. Edit time = seconds spent in the "
              "method's apply function (EasyEdit's `time`), over all edits, and per edit.", ""]
    notes: list[str] = []
    rows = combine_seeds(rows)
    for (protocol, bs, n, split), group in _groups(rows).items():
        datasets = sorted({r["dataset"] for r in group}, key=lambda d: (d != "zsre", d))
        methods = list(dict.fromkeys(r["method"] for r in group))
        by = {(r["dataset"], r["method"]): r for r in group}
        seeds = sorted({s for r in group for s in r.get("seeds") or []})
        lines.append(f"## {protocol} protocol, batch size {bs}, {n} edits"
                     + (f", {split} split" if split != "all" else "")
                     + (f", seeds {', '.join(map(str, seeds))}" if seeds else ""))
        lines.append("")
        def scored(d, key):
            return any(by.get((d, m), {}).get(key) is not None for m in methods)
        columns = {d: [("reliability", "Rel."), ("generality", "Gen.")]
                   + ([(key, label) for key, label in SPLIT_LABELS.items()] if d == "counterfact"
                      and scored(d, "generality_paraphrase") else [])
                   + [("locality", "Loc.")]
                   + ([("same_subject", "Same-subj.")] if scored(d, "same_subject") else [])
                   + [("average", "Avg.")]
                   + ([("portability", "Port.")] if scored(d, "portability") else [])
                   + [(key, label) for key, label in PORTABILITY_LABELS.items() if scored(d, key)]
                   + [(key, label) for key, label in GENERATION_LABELS.items() if scored(d, key)] for d in datasets}
        head = ["Method"]
        for d in datasets:
            head += [f"{d} {label}" for _, label in columns[d]] + [f"{d} edit s (s/edit)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in methods:
            cells = [m]
            for d in datasets:
                r = by.get((d, m))
                width = len(columns[d]) + 1
                if r is None:
                    cells += [""] * width
                    continue
                if r["status"] in ("error", "unavailable offline") and not r["cases"]:
                    cells += [r["status"]] + ["–"] * (width - 1)
                else:
                    flag = "" if r["status"] == "complete" else f" ({r['status']}, {r['cases']} edits)"
                    values = [_fmt(r[key], sd=r.get(f"{key}_sd")) for key, _ in columns[d]]
                    values[0] += flag
                    cells += values + [f"{_fmt(r['edit_seconds'], 0)} ({_fmt(r['seconds_per_edit'], 2)})"]
                if r.get("skipped_records"):
                    notes.append(f"- {d} / {m}: {r['skipped_records']} records of the split skipped by the record "
                                 "check (listed in results.jsonl, type `skipped`)")
                if r.get("portability_unscored"):
                    notes.append(f"- {d} / {m} ({protocol}): portability of {r['portability_unscored']} edits "
                                 "unscored: EasyEdit's generation scorer failed on them (`portability_unscored` "
                                 "in results.jsonl)")
                if r["error"]:
                    notes.append(f"- {d} / {m} ({protocol}): **{r['status']}**: {r['error']}")
                if r["rollback"] == "DIFFERS":
                    notes.append(f"- {d} / {m} ({protocol}): rollback did NOT restore the model bit for bit")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        how = {r["method"]: r["note"] for r in group if r.get("note")}
        rollback = {r["method"]: r["rollback"] for r in group}
        origin = {r["method"]: r["hparams_origin"] for r in group if r.get("hparams_origin")}
        if how:
            lines.append("How each method ran:")
            lines.append("")
            for m in methods:
                if m in how:
                    settings = f"; hparams {origin[m]}" if m in origin else ""
                    lines.append(f"- {m}: {how[m]}{settings}; rollback check: {rollback.get(m)}")
            lines.append("")
        steps = [(r["dataset"], r["method"], r["steps"]) for r in group if r.get("steps")]
        for d, m, per_step in steps:
            lines.append(f"Per-step scores ({d} / {m}, edits so far):")
            lines.append("")
            lines.append("| step | Rel. | Gen. | Loc. | Same-subj. | Avg. |")
            lines.append("|---|---|---|---|---|---|")
            for k, s in per_step.items():
                lines.append(f"| {k} | {_fmt(s['reliability'])} | {_fmt(s['generality'])} | "
                             f"{_fmt(s['locality'])} | {_fmt(s.get('same_subject'))} | {_fmt(s['average'])} |")
            lines.append("")
    lines += general_ability_table(rows)
    lines += fluency_table(rows)
    if notes:
        lines += ["Problems:", ""] + list(dict.fromkeys(notes)) + [""]
    return "\n".join(lines)


GENERATION_LABELS = {"gen_em": "EM", "gen_f1": "F1", "gen_em_rephrase": "Gen. EM", "gen_f1_rephrase": "Gen. F1",
                     "wild_em": "WILD", "wild_em_rephrase": "WILD Gen.", "wild_em_instructed": "WILD instr.",
                     "wild_em_rephrase_instructed": "WILD Gen. instr.", "chat_edit": "Chat",
                     "chat_rephrase": "Chat Gen.", "chat_unrelated": "Chat unrel. kept"}


def fluency_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per run with fluency scores, n-gram entropy and perplexity before and after the edits."""
    scored = [r for r in rows if r.get("fluency")]
    if not scored:
        return []
    lines = ["## Fluency (neutral text)", "",
             "n-gram entropy (bits, ROME's weighting) of greedy continuations of neutral prompts and perplexity "
             "of neutral passages (memoe_plugin/eval/fluency.py), on the unedited model and after the first chunk "
             "of edits (after the last, sequential); with seeds, the first seed's.", "",
             "| dataset | protocol | edits | method | entropy before | entropy after | perplexity before | "
             "perplexity after | continuations changed |", "|" + "---|" * 9]
    for r in sorted(scored, key=lambda r: (r["dataset"], r["protocol"], r["batch_size"] or 0, r["method"])):
        f, edits = r["fluency"], r["batch_size"] if r["protocol"] == "batch" else r["num_edits"]
        lines.append(f"| {r['dataset']} | {r['protocol']} | {edits} | {r['method']} | {f['entropy_before']:.3f} | "
                     f"{f['entropy_after']:.3f} | {f['perplexity_before']:.2f} | {f['perplexity_after']:.2f} | "
                     f"{f['continuations_changed']} of {f['continuations']} |")
    return lines + [""]


def general_ability_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per run with probes, each task's accuracy change from the unedited model [95 % CI]."""
    probed = [r for r in rows if r.get("probes")]
    if not probed:
        return []
    tasks = list(dict.fromkeys(task for r in probed for task in r["probes"] if task != "all")) + ["all"]
    lines = ["## General ability (probes)", "",
             "Accuracy change in points from the unedited model on the same probe items, after the first "
             "chunk of edits (before its rollback), with a 95 % interval of the paired differences; "
             "`all` pools the tasks. The unedited accuracy is in the first row.", "",
             "| dataset | protocol | edits | method | " + " | ".join(tasks) + " |",
             "|" + "---|" * (4 + len(tasks))]
    first = probed[0]["probes"]
    lines.append("| | | 0 | unedited | " + " | ".join(f"{first[t]['before']:.1f}" if t in first else "–"
                                                      for t in tasks) + " |")
    for r in sorted(probed, key=lambda r: (r["dataset"], r["protocol"], r["batch_size"] or 0, r["method"])):
        edits = r["batch_size"] if r["protocol"] == "batch" else r["num_edits"]
        cells = []
        for task in tasks:
            c = r["probes"].get(task)
            cells.append("–" if c is None else f"{c['change']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]")
        lines.append(f"| {r['dataset']} | {r['protocol']} | {edits} | {r['method']} | " + " | ".join(cells) + " |")
    return lines + [""]
