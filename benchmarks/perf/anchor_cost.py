"""Per-prompt cost of knowledge anchors next to one forward pass of SmolLM2-135M.

    python benchmarks/perf/anchor_cost.py [--prompts 200] [--backend offline]

For ZsRE prompts ($MEMOE_DATA or the EasyEdit checkout, else the built-in examples) it times:
  * cold anchors: entity extraction for every prefix of the prompt plus the
    embedding lookups (what the first sight of a prompt costs);
  * warm anchors: the same prompt again (cache hit);
  * one generation step: one more token on a cached prompt;
  * one forward pass of the model over the prompt (batch 1, no grad).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch



def prompts(n: int) -> list[str]:
    from memoe_plugin.eval.records import dataset_requests
    return [r["prompt"] for r in dataset_requests("zsre", limit=n, examples_if_missing=True)]


def per_item(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--backend", default="offline")
    args = parser.parse_args(argv)

    from memoe_plugin import MEMoEHyperParams
    from memoe_plugin.adapter import MEMoEAdapter
    from memoe_plugin.assets import memoe_hparams
    from memoe_plugin.assets.smollm2 import load_smollm2

    model, tok = load_smollm2()
    hp = MEMoEHyperParams.from_hparams(memoe_hparams("smollm2-135m"))
    hp.anchor_backend = args.backend
    texts = prompts(args.prompts)
    ids = [tok(t)["input_ids"] for t in texts]
    adapter = MEMoEAdapter.attach(model, tok, hp)
    encoder = adapter.encoder
    try:
        cold = per_item(encoder.features, ids)
        warm = per_item(encoder.features, ids)
        step = per_item(encoder.features, [i + [tok.eos_token_id] for i in ids])
        adapter.detach()
        with torch.no_grad():
            tensors = [torch.tensor([i]) for i in ids]
            model(tensors[0])   # warm-up
            forward = per_item(lambda t: model(t, use_cache=False), tensors)
    finally:
        adapter.detach()
    mean_len = statistics.mean(len(i) for i in ids)
    print(f"threads={torch.get_num_threads()} prompts={len(ids)} mean tokens={mean_len:.1f} backend={args.backend}")
    print(f"{'cold anchors (all prefixes)':32s} {cold * 1e3:8.3f} ms/prompt   {cold / forward * 100:6.2f} % of a forward pass")
    print(f"{'warm anchors (cache hit)':32s} {warm * 1e3:8.3f} ms/prompt   {warm / forward * 100:6.2f} %")
    print(f"{'one generation step':32s} {step * 1e3:8.3f} ms/token    {step / forward * 100:6.2f} %")
    print(f"{'SmolLM2-135M forward (batch 1)':32s} {forward * 1e3:8.3f} ms/prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
