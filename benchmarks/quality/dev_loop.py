"""Quick tuning loop on the DEV split, without EasyEdit: reliability, generality and same-subject locality.

    MEMOE_DATA=../shared/data python benchmarks/quality/dev_loop.py --data zsre-knowedit --num-edits 60 \
        [--chunk 30] [--sequential] [--set layer=21 scope_keys=true] [--dtype bfloat16]

For trying settings fast while tuning. It edits with ``apply_memoe_to_model`` and scores
with the same definitions EasyEdit uses (``memoe_plugin.eval.metrics.target_predictions``:
teacher-forced token accuracy of the target for reliability and generality; for locality,
the share of the answer tokens' argmax predictions unchanged from the unedited model), in
chunks of ``--chunk`` edits rolled back after each, or kept with ``--sequential`` and all
scored after the last. It only ever reads the dev split. Figures that are reported come from
memoe-compare (``scope_table.py``, ``ablations.py``), through EasyEdit itself.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from memoe_plugin import apply_memoe_to_model, get_adapter
from memoe_plugin.eval.data import data_file
from memoe_plugin.eval.metrics import target_predictions
from memoe_plugin.eval.overrides import load_hparams
from memoe_plugin.eval.splits import select
from memoe_plugin.eval.validate import check_records


def load(dataset: str, split: str) -> list[dict]:
    raw = select(json.loads(data_file(dataset).read_text()), split)
    first = lambda v: v[0] if isinstance(v, list) else v   # noqa: E731
    records = []
    for r in raw:
        same = (r.get("locality") or {}).get("Relation_Specificity") or []
        records.append({"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"],
                        "rephrase_prompt": r.get("rephrase_prompt"),
                        "same_subject": [(c["prompt"], first(c["ground_truth"])) for c in same]})
    usable, _ = check_records(records)
    return [records[i] for i in usable]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre-knowedit",
                        choices=("zsre-knowedit", "counterfact-knowedit", "counterfact"))
    parser.add_argument("--num-edits", type=int, default=60)
    parser.add_argument("--chunk", type=int, default=30)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the base model's dtype (the experts train in float32 either way)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [r for r in load(args.data, "dev") if r["rephrase_prompt"] or args.data == "counterfact-knowedit"]
    records = records[:args.num_edits]
    hparams = load_hparams(args.hparams, args.set)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(hparams.model_name)

    def accuracy(prompt, target):
        predicted, wanted = target_predictions(model, tok, prompt, target)
        return sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)
    before = {pair: target_predictions(model, tok, *pair)[0] for r in records for pair in r["same_subject"]}
    scores = {"reliability": [], "generality": [], "same_subject": []}

    def score(chunk):
        for r in chunk:
            scores["reliability"].append(accuracy(r["prompt"], r["target_new"]))
            if r["rephrase_prompt"]:
                scores["generality"].append(accuracy(r["rephrase_prompt"], r["target_new"]))
            for pair in r["same_subject"]:
                after = target_predictions(model, tok, *pair)[0]
                scores["same_subject"].append(sum(a == b for a, b in zip(after, before[pair])) / len(after))
    start, edit_seconds, steps, restore, kept = time.perf_counter(), 0.0, [], None, []
    for lo in range(0, len(records), args.chunk):
        chunk = records[lo:lo + args.chunk]
        t = time.perf_counter()
        _, restore = apply_memoe_to_model(model, tok, [{k: r[k] for k in ("prompt", "target_new", "subject")}
                                                       for r in chunk], hparams)
        edit_seconds += time.perf_counter() - t
        adapter = get_adapter(model)
        steps.append(adapter.last_report.steps)
        if adapter.scope is not None and not args.sequential:   # the key scope's bytes for this chunk's edits
            kept.append(adapter.scope.nbytes / len(chunk))
        if not args.sequential:
            score(chunk)
            restore()
    if args.sequential:
        score(records)
        restore()
    mean = lambda v: round(100 * sum(v) / len(v), 1) if v else None   # noqa: E731
    print(json.dumps({"data": args.data, "split": "dev", "num_edits": len(records), "sequential": args.sequential,
                      "set": args.set, "dtype": args.dtype, **{k: mean(v) for k, v in scores.items()},
                      "mean_steps": round(sum(steps) / len(steps), 1), "edit_seconds": round(edit_seconds),
                      "scope_bytes_per_edit": round(sum(kept) / len(kept)) if kept else None,
                      "seconds": round(time.perf_counter() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
