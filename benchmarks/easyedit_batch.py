"""MEMoE through EasyEdit's BaseEditor.batch_edit on ZsRE or CounterFact; prints EasyEdit's metrics.

    EASYEDIT_PATH=/path/to/EasyEdit python benchmarks/easyedit_batch.py \
        --data zsre --num-edits 30 --batch-size 30 [--sequential] [--set lr=1e-3 steps=80]

Records are read with EasyEdit's own ZsreDataset / CounterFactDataset, scored by
EasyEdit's compute_edit_quality, and rolled back by EasyEdit (batch protocol), or
kept (``--sequential``). Prints reliability, generality, locality (means of
EasyEdit's rewrite_acc, rephrase_acc and neighborhood_acc, in %), their average,
wall time, and whether the model's state_dict came back bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FILES = {"zsre": "zsre_mend_eval_portability_gpt4.json", "counterfact": "counterfact-edit.json"}


def load_records(easyeditor, name: str, path: Path, size: int) -> list[dict]:
    if name == "zsre":
        dataset = easyeditor.ZsreDataset(str(path), size=size)
        records = [dataset[i] for i in range(len(dataset))]
        raw = json.loads(path.read_text())[:size]
        for record, source in zip(records, raw):
            record["subject"] = source.get("subject")
        return records
    raw = json.loads(path.read_text())[:size]   # EasyEdit's flat CounterFact edit split
    return [{"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"],
             "rephrase_prompt": r["rephrase_prompt"], "locality_prompt": r["locality_prompt"],
             "locality_ground_truth": r["locality_ground_truth"]} for r in raw]


def summarise(metrics: list[dict]) -> dict:
    def mean(values):
        return float(np.mean(values)) * 100 if values else float("nan")
    rel = mean([np.mean(m["post"]["rewrite_acc"]) for m in metrics])
    gen = mean([np.mean(m["post"]["rephrase_acc"]) for m in metrics if "rephrase_acc" in m["post"]])
    loc = mean([np.mean(m["post"]["locality"]["neighborhood_acc"]) for m in metrics
                if "neighborhood_acc" in m["post"].get("locality", {})])
    return {"reliability": rel, "generality": gen, "locality": loc, "average": (rel + gen + loc) / 3}


def parse_overrides(items):
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items or [])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--easyedit", default=os.environ.get("EASYEDIT_PATH"))
    parser.add_argument("--hparams", default=str(REPO / "hparams/MEMoE/smollm2-135m.yaml"))
    parser.add_argument("--model", help="model dir (default: the hparams' model_name)")
    parser.add_argument("--data", choices=sorted(FILES), default="zsre")
    parser.add_argument("--data-file")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--set", nargs="*", help="hparam overrides key=value")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    import memoe_plugin
    memoe_plugin.register(args.easyedit)
    import easyeditor
    from easyeditor.util.hparams import HyperParams  # noqa: F401  (EasyEdit import check)

    config = yaml.safe_load(Path(args.hparams).read_text())
    config.update(parse_overrides(args.set))
    if args.model:
        config["model_name"] = args.model
    hparams = memoe_plugin.MEMoEHyperParams.from_dict(config)
    hparams.batch_size = args.batch_size
    path = Path(args.data_file) if args.data_file else DATA / FILES[args.data]
    records = load_records(easyeditor, args.data, path, args.num_edits)

    editor = easyeditor.BaseEditor.from_hparams(hparams)
    original = {k: v.clone() for k, v in editor.model.state_dict().items()}
    start = time.perf_counter()
    metrics, edited_model, restore = editor.batch_edit(
        prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
        rephrase_prompts=[r["rephrase_prompt"] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                          "ground_truth": [r["locality_ground_truth"] for r in records]}},
        sequential_edit=args.sequential, verbose=False)
    seconds = time.perf_counter() - start
    if args.sequential:
        restore()
    state = editor.model.state_dict()
    exact = list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in original)
    edit_times = sorted({m["time"] for m in metrics})
    summary = {"data": args.data, "num_edits": len(records), "batch_size": args.batch_size,
               "protocol": "sequential" if args.sequential else "batch", **summarise(metrics),
               "wall_seconds": seconds, "edit_seconds_total": sum(edit_times),
               "state_dict_restored_exactly": exact, "overrides": parse_overrides(args.set)}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
