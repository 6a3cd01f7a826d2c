"""Bytes an adapter keeps per edit in sequential editing, by part, marginal between points of one run.

    MEMOE_DATA=../shared/data python benchmarks/memory/kept_bytes.py --data zsre-knowedit --points 100,200 \
        [--chunk 10] [--hparams smollm2-135m-sequential] [--set key=value ...] [--split test]

Edits the split's usable records with ``apply_memoe_to_model`` in calls of ``--chunk`` (no rollback). At each point it
saves the adapter (``save_adapter``, to a temporary folder) and reads what it keeps in the process
(``memoe_plugin.persist.state.kept_bytes_by_part``: keys, values, key inputs, anti-keys, subject vectors, experts,
output memory, and the shared part kept once). Between consecutive points it prints the marginal bytes per edit: of
the saved file, of the process's adapter and of each part. One JSON line per point, then one per interval.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre-knowedit")
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--points", default="100,200", help="edit counts at which to measure (ascending)")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--hparams", default="smollm2-135m-sequential")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memoe_plugin import apply_memoe_to_model, get_adapter, save_adapter
    from memoe_plugin.eval.data import data_file
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.eval.records import normalise_record
    from memoe_plugin.eval.splits import select
    from memoe_plugin.eval.validate import check_records
    from memoe_plugin.persist.state import kept_bytes_by_part
    torch.set_num_threads(args.threads)
    points = [int(p) for p in args.points.split(",")]
    hparams = load_hparams(args.hparams, args.set)
    raw = select(json.loads(data_file(args.data).read_text()), args.split)
    records = [normalise_record(r, i) for i, r in enumerate(raw)]
    usable, _ = check_records(records)
    requests = [{k: records[i][k] for k in ("prompt", "target_new", "subject") if k in records[i]}
                for i in usable][:points[-1]]
    if len(requests) < points[-1]:
        raise SystemExit(f"the {args.split} split has {len(requests)} usable records, fewer than {points[-1]}")
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hparams.model_name)
    measured, done, start = [], 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for point in points:
            while done < point:
                step = min(args.chunk, point - done)
                _, restore = apply_memoe_to_model(model, tok, requests[done:done + step], hparams)
                done += step
            adapter = get_adapter(model)
            path = save_adapter(model, Path(folder) / f"at-{point}.safetensors")
            row = {"edits": point, "file_bytes": path.stat().st_size, "process_bytes": adapter.kept_bytes,
                   "parts": kept_bytes_by_part(adapter), "keys": len(adapter.scope or ()),
                   "seconds": round(time.perf_counter() - start, 1)}
            measured.append(row)
            print(json.dumps({"data": args.data, "hparams": args.hparams, "set": args.set, **row}), flush=True)
    restore()
    for a, b in zip(measured, measured[1:]):
        edits = b["edits"] - a["edits"]
        per_edit = lambda key: round((b[key] - a[key]) / edits)   # noqa: E731
        parts = {part: round((b["parts"].get(part, 0) - a["parts"].get(part, 0)) / edits)
                 for part in sorted(set(a["parts"]) | set(b["parts"]))}
        print(json.dumps({"interval": [a["edits"], b["edits"]], "file_bytes_per_edit": per_edit("file_bytes"),
                          "process_bytes_per_edit": per_edit("process_bytes"),
                          "keys_per_edit": round((b["keys"] - a["keys"]) / edits, 2),
                          "parts_bytes_per_edit": parts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
