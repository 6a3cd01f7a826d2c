"""Peak memory and time per edit of one MEMoE edit call against its batch size (issue: memory bounded by a setting).

    MEMOE_DATA=../shared/data python benchmarks/memory/batch_memory.py --sizes 100,1000 \
        [--set train_micro_batch=0] [--data zsre-knowedit] [--threads 1]

Each size runs in a fresh process (so one size's peak does not hide another's): the model is loaded, the
resident memory read (the model's share), then ``apply_memoe_to_model`` edits that many test-split records
in one call; the script prints, per size, the peak resident memory above the loaded model (Linux ``VmHWM``
minus the RSS after loading), the edit seconds, seconds per edit, training steps, and the teacher-forced
reliability of the edits. The peak includes everything the call holds: training, scope keys, anti-keys.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def one_size(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.eval.data import data_file
    from memoe_plugin.eval.metrics import token_accuracy
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.eval.records import normalise_record
    from memoe_plugin.eval.splits import select
    from memoe_plugin.eval.validate import check_records
    torch.set_num_threads(args.threads)
    hparams = load_hparams(args.hparams, args.set)
    raw = select(json.loads(data_file(args.data).read_text()), "test")
    records = [normalise_record(r, i) for i, r in enumerate(raw)]
    usable, _ = check_records(records)
    requests = [{k: records[i][k] for k in ("prompt", "target_new", "subject") if k in records[i]}
                for i in usable][:args.size]
    if len(requests) < args.size:
        raise SystemExit(f"the test split has {len(requests)} usable records, fewer than {args.size}")
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hparams.model_name)
    loaded = status_kib("VmRSS")
    phases = watch_phases(loaded)
    reset_peak()
    start = time.perf_counter()
    _, restore = apply_memoe_to_model(model, tok, requests, hparams)
    seconds = time.perf_counter() - start
    peak = max([status_kib("VmHWM")] + [p.pop("peak_kib") for p in phases])
    adapter = get_adapter(model)
    sample = requests[:: max(1, len(requests) // 50)]
    reliability = 100 * sum(token_accuracy(model, tok, r["prompt"], r["target_new"]) for r in sample) / len(sample)
    scope_bytes = adapter.scope.nbytes if adapter.scope is not None else 0
    restore()
    return {"edits": len(requests), "peak_above_model_gib": round((peak - loaded) / 2**20, 2),
            "model_rss_gib": round(loaded / 2**20, 2), "edit_seconds": round(seconds, 1),
            "seconds_per_edit": round(seconds / len(requests), 2), "steps": adapter.last_report.steps,
            "reliability_sample": round(reliability, 1), "scope_bytes_per_edit": round(scope_bytes / len(requests)),
            "phases": phases, "set": args.set}


def watch_phases(loaded: int) -> list:
    """Where the call's memory goes: the resident memory above the model before and after each phase of
    ``train_experts`` (the key registration, which captures every batch's layer inputs once; the training loop,
    which reuses them) and the peak inside it. The overall peak is the largest of the phases' and the rest's."""
    from memoe_plugin.training import trainer
    phases = []

    def watch(name: str, function):
        def wrapped(*args, **kwargs):
            before = status_kib("VmRSS")
            reset_peak()
            out = function(*args, **kwargs)
            phases.append({"phase": name, "rss_before_gib": round((before - loaded) / 2**20, 2),
                           "peak_gib": round((status_kib("VmHWM") - loaded) / 2**20, 2),
                           "rss_after_gib": round((status_kib("VmRSS") - loaded) / 2**20, 2),
                           "peak_kib": status_kib("VmHWM")})
            return out
        return wrapped
    trainer.register_keys = watch("register_keys (captures, keys, anti-keys)", trainer.register_keys)
    trainer._fit = watch("training loop", trainer._fit)
    return phases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated batch sizes (one process each)")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)      # the child's one size
    parser.add_argument("--data", default="zsre-knowedit")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.size:
        print(json.dumps(one_size(args)), flush=True)
        return 0
    for size in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, __file__, "--size", str(size), "--data", args.data, "--hparams", args.hparams,
                   "--threads", str(args.threads)] + (["--set", *args.set] if args.set else [])
        result = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if result.returncode == 0 and lines else
              json.dumps({"edits": size, "error": result.stderr[-800:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
