"""Cost of one training step's forward through the layers above the adapter, with and without
the silent-prefix skip, on the first ZsRE edits (SmolLM2-135M, tuned file).

    OMP_NUM_THREADS=1 python benchmarks/perf/training_step.py [--num-edits 30] [--repeats 3]

For each length bucket the script builds the cached upper stack twice (the prefix that the
locality guard keeps silent in every row taken from a KV cache, or recomputed), checks both
against a full forward pass (max logit gap), and times ``target_logits()`` (no grad). The
experts are random, so the bypass is active and its delta is non-zero.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from memoe_plugin import MEMoEHyperParams
    from memoe_plugin.adapter import MEMoEAdapter
    from memoe_plugin.assets import memoe_hparams
    from memoe_plugin.eval.records import dataset_requests
    from memoe_plugin.assets.smollm2 import load_smollm2
    from memoe_plugin.training.batches import build_edit_batches
    from memoe_plugin.training.fast_path import UpperStack, full_target_logits

    requests = dataset_requests("zsre", limit=args.num_edits, examples_if_missing=True)
    model, tok = load_smollm2()
    hparams = MEMoEHyperParams.from_hparams(memoe_hparams("smollm2-135m"))
    adapter = MEMoEAdapter.attach(model, tok, hparams)
    try:
        adapter.register_knowledge(requests)
        torch.nn.init.normal_(adapter.bypass.experts, std=0.02)
        totals = {False: 0.0, True: 0.0}
        print(f"{'bucket':>6s} {'rows x width':>12s} {'skipped':>8s} {'plain s':>8s} {'skip s':>7s} {'max gap':>8s}")
        for i, batch in enumerate(build_edit_batches(tok, requests, "cpu")):
            with torch.no_grad():
                reference = full_target_logits(adapter, batch)
                seconds, gap, start = {}, 0.0, 0
                for skip in (False, True):
                    stack = UpperStack(adapter, batch, skip_silent_prefix=skip)
                    gap = max(gap, (stack.target_logits() - reference).abs().max().item())
                    begin = time.perf_counter()
                    for _ in range(args.repeats):
                        stack.target_logits()
                    seconds[skip] = (time.perf_counter() - begin) / args.repeats
                    totals[skip] += seconds[skip]
                    start = stack.start if skip else start
            rows, width = batch.input_ids.shape
            print(f"{i:6d} {rows:5d} x {width:<5d} {start:8d} {seconds[False]:8.3f} {seconds[True]:7.3f} {gap:8.1e}")
        print(f"all buckets: {totals[False]:.3f} s without the skip, {totals[True]:.3f} s with it "
              f"({(1 - totals[True] / totals[False]) * 100:.0f}% less); threads={torch.get_num_threads()}")
    finally:
        adapter.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
