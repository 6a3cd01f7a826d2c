"""Training step time on cached activations against full passes, in float32, bfloat16 and float16 (issue 51).

    MEMOE_DATA=../shared/data python benchmarks/perf/half_precision.py [--num-edits 30] [--dtypes float32,bfloat16]

SmolLM2-135M loaded in each dtype, the shipped batch file, one call of N ZsRE dev edits with ``early_stop`` off. A
step's time is measured as (time of a call of 1 + ``--steps`` steps − time of a call of 1 step) / ``--steps``, so
that what a call does once (captures, keys, the fast path's check) cancels. Each dtype is timed on the fast path (as
training takes it) and on full passes (the fast path refused), in alternating order in one process. Prints, per
dtype, which path training took, both step times and their ratio, as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.eval.data import data_file
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.eval.records import normalise_record
    from memoe_plugin.eval.splits import select
    from memoe_plugin.eval.validate import check_records
    import memoe_plugin.training.fast_path as fast_path
    torch.set_num_threads(args.threads)
    raw = select(json.loads(data_file("zsre-knowedit").read_text()), "dev")
    records = [normalise_record(r, i) for i, r in enumerate(raw)]
    usable, _ = check_records(records)
    requests = [{k: records[i][k] for k in ("prompt", "target_new", "subject")} for i in usable][:args.num_edits]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hp = load_hparams("smollm2-135m", ["early_stop=false"])
        model = AutoModelForCausalLM.from_pretrained(hp.model_name, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(hp.model_name)

        def call(steps: int, full: bool) -> tuple[float, bool]:
            hp.steps = steps
            original = fast_path.UpperStack
            if full:
                fast_path.UpperStack = None          # constructing it raises TypeError: training runs full passes
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    _, restore = apply_memoe_to_model(model, tok, requests, hp)
                    seconds = time.perf_counter() - start
            finally:
                fast_path.UpperStack = original
            cached = get_adapter(model).last_report.used_cached_activations
            restore()
            return seconds, cached

        call(1, False)   # the relation prototypes of this dtype, built once before any timing
        step, taken = {}, None
        for full in (False, True, False, True):
            one, cached = call(1, full)
            many, _ = call(1 + args.steps, full)
            step.setdefault(full, []).append((many - one) / args.steps)
            if not full:
                taken = cached
        fast, slow = min(step[False]), min(step[True])
        print(json.dumps({"dtype": dtype_name, "fast_path_taken": taken, "step_seconds_cached": round(fast, 3),
                          "step_seconds_full": round(slow, 3), "cached_over_full": round(fast / slow, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
