"""Time of one sequential edit call early in a run and late in it (from a checkpoint), on SmolLM2-135M.

    OMP_NUM_THREADS=1 python benchmarks/perf/late_edit_call.py \\
        --checkpoint runs/seq1000-cf/checkpoints/<run>/chunk-00089.safetensors --data counterfact --at 900 \\
        [--hparams memoe_plugin/assets/hparams/MEMoE/smollm2-135m-sequential.yaml] [--repeats 2] [--profile 15]

A sequential run keeps more with every batch: experts (one per ``edits_per_expert`` edits),
scope keys, the guard's anchors and the output memory. Whatever one edit call does per kept
item makes the batch time grow. The script times one call that edits records ``at..at+9`` of
the test split twice: on the checkpointed adapter ("late"), and on an adapter that has edited
records 0..9 only ("early"), each ``--repeats`` times on a fresh copy; the same requests, so
only what the adapter holds differs. It prints
what the adapter holds, the seconds per call, and, with ``--profile N``, the N functions with
the most time of their own in the last late call (cProfile).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an adapter saved by a sequential memoe-compare run")
    parser.add_argument("--data", default="counterfact", help="dataset of that run (its test split)")
    parser.add_argument("--at", type=int, required=True, help="edits in the checkpoint: the late call edits at..at+9")
    parser.add_argument("--hparams", default="memoe_plugin/assets/hparams/MEMoE/smollm2-135m-sequential.yaml")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions of the last late call")
    args = parser.parse_args(argv)

    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter, load_adapter, remove_memoe
    from memoe_plugin.assets.smollm2 import load_smollm2
    from memoe_plugin.eval.records import dataset_requests
    from memoe_plugin.eval.splits import select

    records = select(dataset_requests(args.data), "test")
    hp = MEMoEHyperParams.from_hparams(args.hparams)
    model, tok = load_smollm2()
    n = args.batch_size

    def held(label):
        adapter = get_adapter(model)
        print(f"{label}: experts {adapter.bypass.experts.shape[0]}, scope keys {len(adapter.bypass.scope or [])}, "
              f"guard anchors {len(adapter.guard.keys) if adapter.guard else 0}, "
              f"memory rows {len(adapter.memory) if adapter.memory is not None else 0}")

    def timed(setup, batch, label, profile=None):
        seconds = []
        for _ in range(args.repeats):
            setup()
            if not seconds:
                held(label)
            if profile is not None:
                profile.enable()
            start = time.perf_counter()
            apply_memoe_to_model(model, tok, batch, hp)
            seconds.append(time.perf_counter() - start)
            if profile is not None:
                profile.disable()
            remove_memoe(model)
        print(f"{label} call: " + ", ".join(f"{s:.1f} s" for s in seconds))

    late_batch = records[args.at:args.at + n]
    timed(lambda: apply_memoe_to_model(model, tok, records[:n], hp), late_batch, "early")
    profile = cProfile.Profile() if args.profile else None
    timed(lambda: load_adapter(model, tok, args.checkpoint), late_batch, "late", profile)
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
