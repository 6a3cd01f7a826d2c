"""What the key scope's parts cost: edit time and bytes per edit of the same edits under several settings, in one
process, rounds in alternating order.

    MEMOE_DATA=../shared/data python benchmarks/perf/scope_cost.py [--data zsre-knowedit] [--split test] \\
        [--num-edits 30] [--rounds 2] [--hparams smollm2-135m] \\
        [--variant "no anti-keys" scope_anti_keys=none] [--variant "chat off" chat=off ...]

Each setting edits the same ``--num-edits`` records of ``--split`` in one call (the batch protocol's chunk) and is
rolled back; the rounds run the settings forward, then backward, so that a slower machine minute falls on every
setting alike. Printed per setting: median seconds of the call, its ratio to the first ``--variant`` (by default
"no anti-keys", the scope without anti-keys: issue 46's ratio), the scope's bytes per edit (``KeyScope.nbytes``, what
the saved adapter keeps of it) and the mean training steps. The relation prototypes (``scope_anti_keys:
prototypes``) are built once per model and layer and cached; ``--build-once`` also times that build in a fresh
cache directory. Only timing and sizes: scores come from memoe-compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

DEFAULT_VARIANTS = [["no anti-keys", "scope_anti_keys=none", "scope_stop_keys=false"],
                    ["no anti-keys, chat off", "scope_anti_keys=none", "scope_stop_keys=false", "chat=off"],
                    ["shipped, chat off", "chat=off"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre-knowedit")
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"),
                        help="a setting to time beside the shipped file: a label, then overrides")
    parser.add_argument("--build-once", action="store_true", help="also time building the relation prototypes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "quality"))
    from dev_loop import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.eval.overrides import load_hparams

    variants = args.variant or DEFAULT_VARIANTS
    settings = {label: load_hparams(args.hparams, items) for label, *items in variants}
    settings["shipped"] = load_hparams(args.hparams, [])
    records = [{k: r[k] for k in ("prompt", "target_new", "subject")}
               for r in load(args.data, args.split)[:args.num_edits]]
    shipped = settings["shipped"]
    model = AutoModelForCausalLM.from_pretrained(shipped.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(shipped.model_name)
    if args.build_once:
        previous = os.environ.get("MEMOE_CACHE")
        with tempfile.TemporaryDirectory() as fresh:
            os.environ["MEMOE_CACHE"] = fresh
            start = time.perf_counter()
            _, restore = apply_memoe_to_model(model, tok, records[:1], shipped)
            print(json.dumps({"one edit with the prototypes built anew (seconds)": round(time.perf_counter() - start,
                                                                                          1)}), flush=True)
            restore()
        if previous is None:
            os.environ.pop("MEMOE_CACHE")
        else:
            os.environ["MEMOE_CACHE"] = previous
    for label in settings:   # warm-up: lazy imports, and each setting's relation prototypes (cached per template)
        _, restore = apply_memoe_to_model(model, tok, records[:1], settings[label])
        restore()
    order = list(settings)
    seconds = {label: [] for label in order}
    sizes, steps = {}, {}
    for k in range(args.rounds):
        for label in (order if k % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            _, restore = apply_memoe_to_model(model, tok, records, settings[label])
            seconds[label].append(time.perf_counter() - start)
            adapter = get_adapter(model)
            scope = adapter.scope
            sizes[label] = None if scope is None else round(scope.nbytes / len(records))
            steps[label] = adapter.last_report.steps
            restore()
    base = statistics.median(seconds[order[0]])
    for label in order:
        median = statistics.median(seconds[label])
        print(json.dumps({"setting": label, "seconds": round(median, 1), "all": [round(s, 1) for s in seconds[label]],
                          f"ratio to {order[0]!r}": round(median / base, 2), "scope_bytes_per_edit": sizes[label],
                          "steps": steps[label], "edits": len(records), "data": args.data, "split": args.split}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
