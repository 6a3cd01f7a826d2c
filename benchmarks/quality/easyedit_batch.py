"""MEMoE through EasyEdit's BaseEditor.batch_edit on ZsRE or CounterFact; prints EasyEdit's metrics.

    EASYEDIT_PATH=/path/to/EasyEdit python benchmarks/quality/easyedit_batch.py \
        --data zsre --num-edits 30 --batch-size 30 [--sequential] [--set lr=1e-3 steps=80]

Records are read with EasyEdit's own ZsreDataset / CounterFactDataset (as memoe-compare
reads them), scored by EasyEdit's compute_edit_quality, and rolled back by EasyEdit (batch
protocol), or kept (``--sequential``). Prints reliability, generality, locality (means of
EasyEdit's rewrite_acc, rephrase_acc and neighborhood_acc, in %), their average, wall
time, and whether the model's state_dict came back bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import memoe_plugin
from memoe_plugin.assets import memoe_hparams
from memoe_plugin.eval.compare import load_records, request_kwargs
from memoe_plugin.eval.data import data_file
from memoe_plugin.eval.metrics import aggregate
from memoe_plugin.eval.overrides import load_hparams, parse_assignments
from memoe_plugin.eval.state import state_fingerprint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--easyedit", default=os.environ.get("EASYEDIT_PATH"))
    parser.add_argument("--hparams", default=str(memoe_hparams("smollm2-135m")))
    parser.add_argument("--model", help="model dir (default: the hparams' model_name)")
    parser.add_argument("--data", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--data-file", help="default: the dataset's file in $MEMOE_DATA or the EasyEdit checkout")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    memoe_plugin.register(args.easyedit)
    import easyeditor

    hparams = load_hparams(args.hparams, args.set, model_name=args.model, batch_size=args.batch_size)
    path = data_file(args.data, args.data_file, args.easyedit)
    records = load_records(easyeditor, args.data, path)[:args.num_edits]
    kwargs = request_kwargs(records, [""] * len(records))
    kwargs.pop("loc_prompts")

    editor = easyeditor.BaseEditor.from_hparams(hparams)
    original = state_fingerprint(editor.model)
    start = time.perf_counter()
    metrics, _, restore = editor.batch_edit(**kwargs, sequential_edit=args.sequential, verbose=False)
    seconds = time.perf_counter() - start
    if args.sequential:
        restore()
    edit_times = sorted({m["time"] for m in metrics})
    summary = {"data": args.data, "num_edits": len(records), "batch_size": args.batch_size,
               "protocol": "sequential" if args.sequential else "batch", **aggregate(metrics),
               "wall_seconds": seconds, "edit_seconds_total": sum(edit_times),
               "state_dict_restored_exactly": state_fingerprint(editor.model) == original,
               "overrides": parse_assignments(args.set)}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
