"""Lifelong editing on real facts: one long sequential stream, scored after the last batch, with its cost along the way.

    MEMOE_DATA=../shared/data python benchmarks/quality/long_stream.py --stream mixed --edits 3000 --batch 10 \\
        --out runs/stream-3000 [--resume] [--hparams smollm2-135m-sequential] [--set key=value ...]
    MEMOE_DATA=../shared/data python benchmarks/quality/long_stream.py --stream counterfact --edits 10000 \\
        --batch 100 --sample 1000 --out runs/stream-cf-10000

Streams (every record from the test split, ``memoe_plugin.eval.splits``, unless said otherwise):

* ``mixed``: ZsRE first (KnowEdit's ZsRE-test-all, then the MEND-format file's records it does not hold), then
  CounterFact (counterfact-edit) to the end; every 10th edit is a KnowEdit wiki_counterfact record, so that
  same-subject locality (``Relation_Specificity``) is measured inside the stream, from its start to its end.
* ``counterfact``: CounterFact's test records, then its dev records to fill the stream, then (past its 9,917 usable
  records) KnowEdit wiki_counterfact's dev records (as edits only: only CounterFact test records are scored);
  ``--sample`` test records spread evenly over the stream are scored.

The model is edited with ``apply_memoe_to_model`` (the core, as EasyEdit's sequential ``batch_edit`` calls it),
``--batch`` edits per call, no rollback; after the last call every scored edit is scored with EasyEdit's
teacher-forced definitions (``memoe_plugin.eval.metrics``): reliability and generality are the target's token
accuracy after the edit prompt and its rephrasing, locality and same-subject locality the share of the answer's
tokens whose greedy prediction is the unedited model's. Unrelated locality uses the record's own locality prompt
(CounterFact, MEND ZsRE), else the next record's same-subject prompt (another subject).

Cost along the stream, for every ``--block`` edits (default 1,000): seconds per edit, peak resident memory above
the loaded model while editing that block, the bytes the adapter keeps (experts, gate, scope, output memory) and the
inference overhead of the edited model on a fixed set of prompts (teacher-forced, batch 1; base and edited
alternate). The run checkpoints the adapter (``save_adapter``) every ``--checkpoint-every`` calls; ``--resume``
continues a stopped run to the same result. Writes ``stream.json`` (settings, per-call seconds, blocks, the
unedited model's answers) and, after scoring, ``summary.json`` and ``summary.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "memory"))
from batch_memory import reset_peak, status_kib  # noqa: E402  (the benchmarks' one reader of /proc)

WIKI_EVERY = 10


def flat(record: dict, source: str, scored: bool = True) -> dict:
    """A record in the flat shape, with its same-subject prompts, source file and whether it is scored."""
    from memoe_plugin.eval.records import normalise_record
    out = normalise_record(record)
    same = ((record.get("locality") or {}).get("Relation_Specificity") or []) if isinstance(record.get("locality"),
                                                                                          dict) else []
    first = lambda v: v[0] if isinstance(v, list) else v   # noqa: E731
    out["same_subject"] = [(c["prompt"], first(c["ground_truth"])) for c in same if c.get("prompt")]
    if source != "counterfact":     # KnowEdit's locality is same-subject: unrelated comes from the next record
        out.pop("locality_prompt", None), out.pop("locality_ground_truth", None)
    if source == "zsre-mend":
        out["locality_prompt"], out["locality_ground_truth"] = record.get("loc"), first(record.get("loc_ans"))
    out.update(source=source, scored=scored)
    return out


def usable(records: list[dict]) -> list[dict]:
    from memoe_plugin.eval.validate import check_records
    good, _ = check_records(records)
    return [records[i] for i in good]


def build_stream(kind: str, edits: int, sample: int) -> list[dict]:
    from memoe_plugin.eval.data import data_file
    from memoe_plugin.eval.splits import select

    def read(dataset, split="test"):
        return select(json.loads(data_file(dataset).read_text()), split)
    if kind == "mixed":
        zsre = usable([flat(r, "zsre-knowedit") for r in read("zsre-knowedit")])
        held = {r["prompt"] for r in zsre}
        zsre += usable([flat(r, "zsre-mend") for r in read("zsre") if r["src"] not in held])
        wiki = usable([flat(r, "counterfact-knowedit") for r in read("counterfact-knowedit")])
        counterfact = usable([flat(r, "counterfact") for r in read("counterfact")])
        main = iter(zsre + counterfact)
        wiki = iter(wiki)
        stream = [next(wiki) if (i + 1) % WIKI_EVERY == 0 else next(main) for i in range(edits)]
    elif kind == "counterfact":
        test = usable([flat(r, "counterfact") for r in read("counterfact")])
        dev = usable([flat(r, "counterfact", scored=False) for r in read("counterfact", "dev")])
        # counterfact-edit holds 9,917 usable records: KnowEdit's wiki_counterfact dev records fill a longer stream
        fill = usable([flat(r, "counterfact-knowedit", scored=False) for r in read("counterfact-knowedit", "dev")])
        stream = (test + dev + fill)[:edits]
        tested = [i for i, r in enumerate(stream) if r["scored"]]
        keep = set(tested[::max(1, len(tested) // sample)][:sample])
        for i, r in enumerate(stream):
            r["scored"] = i in keep
    else:
        raise SystemExit(f"unknown stream {kind!r}: mixed or counterfact")
    if len(stream) < edits:
        raise SystemExit(f"the {kind} stream has {len(stream)} usable records, fewer than --edits {edits}")
    for i, r in enumerate(stream):   # unrelated locality for records without their own: the next record's
        if not r.get("locality_prompt"):
            other = next((s for s in stream[i + 1:] + stream[:i] if s["same_subject"] and s["subject"] != r["subject"]),
                         None)
            if other is not None:
                r["locality_prompt"], r["locality_ground_truth"] = other["same_subject"][0]
    return stream


def predictions(model, tok, prompt: str, answer: str) -> list[int]:
    from memoe_plugin.eval.metrics import target_predictions
    return target_predictions(model, tok, prompt, answer)[0]


def unedited_answers(model, tok, stream: list[dict]) -> dict:
    """The unedited model's greedy predictions of every scored locality and same-subject answer."""
    out = {}
    for i, r in enumerate(stream):
        if not r["scored"]:
            continue
        if r.get("locality_prompt"):
            out[f"{i}/loc"] = predictions(model, tok, r["locality_prompt"], r["locality_ground_truth"])
        for j, (prompt, answer) in enumerate(r["same_subject"]):
            out[f"{i}/same/{j}"] = predictions(model, tok, prompt, answer)
    return out


def overhead(model, tok, adapter, prompts: list[str], rounds: int = 2) -> float:
    """Base tokens/s over edited tokens/s, minus 1 (teacher-forced, batch 1; base and edited alternate)."""
    items = [tok(p, return_tensors="pt") for p in prompts]
    seconds = {"base": 0.0, "edited": 0.0}
    for k in range(rounds):
        for item in items:
            for which in (("base", "edited") if k % 2 else ("edited", "base")):
                if which == "base":
                    adapter.detach()
                start = time.perf_counter()
                with torch.no_grad():
                    model(**item, use_cache=False)
                seconds[which] += time.perf_counter() - start
                if which == "base":
                    adapter.reattach()
    return seconds["edited"] / seconds["base"] - 1


def score(model, tok, stream: list[dict], before: dict) -> list[dict]:
    from memoe_plugin.eval.metrics import token_accuracy
    rows = []
    for i, r in enumerate(stream):
        if not r["scored"]:
            continue
        row = {"index": i, "source": r["source"], "reliability": token_accuracy(model, tok, r["prompt"], r["target_new"])}
        if r.get("rephrase_prompt"):
            row["generality"] = token_accuracy(model, tok, r["rephrase_prompt"], r["target_new"])
        if f"{i}/loc" in before:
            now = predictions(model, tok, r["locality_prompt"], r["locality_ground_truth"])
            row["locality"] = sum(a == b for a, b in zip(now, before[f"{i}/loc"])) / len(now)
        same = []
        for j, (prompt, answer) in enumerate(r["same_subject"]):
            now = predictions(model, tok, prompt, answer)
            same.append(sum(a == b for a, b in zip(now, before[f"{i}/same/{j}"])) / len(now))
        if same:
            row["same_subject"] = sum(same) / len(same)
        rows.append(row)
    return rows


def summarise(rows: list[dict], key: str = "source") -> dict:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    groups["all"] = rows
    out = {}
    for name, group in groups.items():
        cell = {"edits": len(group)}
        for score in ("reliability", "generality", "locality", "same_subject"):
            values = [g[score] for g in group if score in g]
            cell[score] = round(100 * sum(values) / len(values), 1) if values else None
        parts = [cell[s] for s in ("reliability", "generality", "locality", "same_subject") if cell[s] is not None]
        cell["average"] = round(sum(parts) / len(parts), 1) if parts else None
        out[name] = cell
    return out


def markdown(summary: dict) -> str:
    """summary.md: scores by source (and by position in the stream), then the cost of every block of edits."""
    names = ("reliability", "generality", "locality", "same_subject", "average")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"   # noqa: E731
    made = summary.get("edits_made", summary["settings"]["edits"])
    lines = [f"# {summary['settings']['stream']} stream: {made} sequential edits"
             + (f" (of {summary['settings']['edits']} planned: stopped there, --resume goes on)"
                if made < summary["settings"]["edits"] else "") + f", batches of "
             f"{summary['settings']['batch']} ({summary['settings']['hparams']}"
             + (f", {' '.join(summary['settings']['set'])}" if summary["settings"]["set"] else "") + ")", "",
             f"Scored after the last batch: {summary['scored']} test records. Editing took "
             f"{summary['edit_seconds'] / 60:.1f} min.", "",
             "| part | edits | Rel | Gen | Loc | Same-subject | Avg |", "|---|---|---|---|---|---|---|"]
    parts = list(summary["by_source"].items()) + list(summary.get("by_position", {}).items())
    for name, cell in parts:
        lines.append(f"| {name} | {cell['edits']} | " + " | ".join(fmt(cell[n]) for n in names) + " |")
    lines += ["", "| edits so far | s / edit (block) | peak RSS above model, GiB | kept bytes | per edit | "
              "inference overhead |", "|---|---|---|---|---|---|"]
    for block in summary["blocks"]:
        lines.append(f"| {block['edits']} | {block['seconds_per_edit']:.2f} | {block['peak_above_model_gib']:.2f} | "
                     f"{block['kept_bytes'] / 2**20:.1f} MiB | {block['kept_bytes'] / block['edits'] / 1024:.1f} KiB | "
                     f"{100 * block['overhead']:.1f} % |")
    blocks = summary["blocks"]
    if len(blocks) > 1:
        lines += ["", f"Time per edit, last block / first block: "
                      f"{blocks[-1]['seconds_per_edit'] / blocks[0]['seconds_per_edit']:.2f}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """The cost table as four panels against the number of edits made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = summary["blocks"]
    edits = [b["edits"] for b in blocks]
    panels = (("seconds_per_edit", "s / edit", 1), ("peak_above_model_gib", "peak RSS above model (GiB)", 1),
              ("kept_bytes", "kept (MiB)", 2**-20), ("overhead", "inference overhead (%)", 100))
    figure, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, (key, label, factor) in zip(axes, panels):
        ax.plot(edits, [b[key] * factor for b in blocks], marker="o")
        ax.set_xlabel("edits made"), ax.set_ylabel(label)
    figure.suptitle(f"{summary['settings']['stream']} stream, batches of {summary['settings']['batch']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", default="mixed", choices=("mixed", "counterfact"))
    parser.add_argument("--edits", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--sample", type=int, default=1000, help="scored test records (counterfact stream)")
    parser.add_argument("--block", type=int, default=1000, help="edits per row of the cost table")
    parser.add_argument("--hparams", default="smollm2-135m-sequential")
    parser.add_argument("--method", default="MEMoE",
                        help="MEMoE, or an EasyEdit method of memoe-compare's registry (UltraEdit, FT-M, ...) with its "
                             "shipped sequential file (needs EASYEDIT_PATH and EasyEdit's stack; no checkpoints)")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="edit calls between checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="edit only up to this many edits of the stream in this process, then score those (a "
                             "later --resume without it goes on to --edits); the summary says how many were made")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memoe_plugin import apply_memoe_to_model, get_adapter, load_adapter, save_adapter
    from memoe_plugin.eval.overrides import load_hparams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path, checkpoint = out / "stream.json", out / "checkpoint.safetensors"
    hparams = load_hparams(args.hparams, args.set)
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hparams.model_name)
    loaded_kib = status_kib("VmRSS")
    stream = build_stream(args.stream, args.edits, args.sample)
    settings = {k: getattr(args, k) for k in ("stream", "edits", "batch", "sample", "block", "hparams", "set")}
    baseline = None
    if args.method != "MEMoE":   # the same stream, scored the same way, edited by another method
        from stream_baseline import easyedit_editor
        baseline, described = easyedit_editor(args.method, model, tok, args.set)
        settings.update(method=args.method, hparams=described["file"])
        if args.resume:
            raise SystemExit("--resume is for MEMoE streams (their adapter is the checkpoint)")
    if args.resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["settings"] != settings:
            raise SystemExit(f"{state_path} was written with other settings ({state['settings']}); use another --out")
        if state["done"] and checkpoint.is_file():
            load_adapter(model, tok, checkpoint)
    else:
        if state_path.exists() and not args.resume:
            raise SystemExit(f"{out} holds a run already: pass --resume, or choose another --out")
        state = {"settings": settings, "hparams": hparams.to_dict(), "done": 0, "calls": [], "blocks": [],
                 "before": unedited_answers(model, tok, stream)}
    probes = [r["prompt"] for r in stream[:: max(1, len(stream) // 24)]][:24]   # named subjects, spread out
    end = len(stream) if args.stop_after is None else min(len(stream), args.stop_after)
    calls = range(state["done"], end, args.batch)
    block_start = time.perf_counter()
    reset_peak()
    for lo in calls:
        chunk = [{k: r[k] for k in ("prompt", "target_new", "subject") if k in r} for r in stream[lo:lo + args.batch]]
        start = time.perf_counter()
        if baseline is None:
            apply_memoe_to_model(model, tok, chunk, hparams)
        else:
            baseline(chunk)
        state["calls"].append(time.perf_counter() - start)
        state["done"] = lo + len(chunk)
        adapter = get_adapter(model)
        if state["done"] % args.block == 0 or state["done"] == len(stream):
            first = len(state["blocks"]) * args.block
            seconds = sum(state["calls"][first // args.batch:state["done"] // args.batch])
            state["blocks"].append({"edits": state["done"], "seconds_per_edit": seconds / (state["done"] - first),
                                    "peak_above_model_gib": (status_kib("VmHWM") - loaded_kib) / 2**20,
                                    # a baseline edits the weights in place: nothing kept beside them, no overhead
                                    "kept_bytes": adapter.kept_bytes if adapter else 0,
                                    "overhead": overhead(model, tok, adapter, probes) if adapter else 0.0,
                                    "wall_seconds": time.perf_counter() - block_start})
            print(json.dumps(state["blocks"][-1]), flush=True)
            block_start = time.perf_counter()
            reset_peak()
        if baseline is None and ((len(state["calls"]) % args.checkpoint_every == 0)
                                 or state["done"] in (len(stream), end)):
            save_adapter(model, checkpoint)
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_path)
    rows = score(model, tok, stream[:state["done"]], state["before"])   # the edits made so far
    summary = {"settings": settings, "edits_made": state["done"], "by_source": summarise(rows),
               "blocks": state["blocks"], "edit_seconds": sum(state["calls"]), "scored": len(rows)}
    # forgetting: the scores of each block of the stream (the first 1,000 edits were made first and scored last)
    summary["by_position"] = {name: cell for name, cell in summarise(
        [dict(r, at=f"edits {r['index'] // args.block * args.block}-{r['index'] // args.block * args.block + args.block}")
         for r in rows], "at").items() if name != "all"}
    with open(out / "rows.jsonl", "w") as handle:   # every scored edit, to summarise again without scoring again
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    plot(summary, out / "cost.png")
    print(json.dumps(summary["by_source"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
