"""Inference cost of a MEMoE-edited SmolLM2-135M next to the base model, measured in one run.

    python benchmarks/inference_overhead.py [--edits 30] [--repeats 3] [--set locality_guard=true]

The adapter is trained on ZsRE edits (../shared/data, else the built-in examples)
with a single step: its experts are non-zero, so every routed token pays for
its expert, and anchors are computed in every forward. Timings go base -> edited
-> base, and the overhead is taken against the mean of the two base runs.
Workloads: teacher-forced scoring of prompt + answer (batch 1 and batch 16,
left-padded, as EasyEdit scores), and greedy ``generate`` (batch 1, 32 new tokens).
Each figure is the best of ``--repeats`` passes over the same inputs; the
anchor cache starts empty for each edited pass.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ZSRE = REPO.parent / "shared" / "data" / "zsre_mend_eval_portability_gpt4.json"


def records(n: int) -> list[dict]:
    if ZSRE.exists():
        return [{"prompt": r["src"], "target_new": r["alt"], "subject": r["subject"],
                 "locality_prompt": r["loc"]} for r in json.loads(ZSRE.read_text())[:n]]
    return json.loads((REPO / "memoe_plugin/data/example_edits.json").read_text())


def workloads(model, tok, recs):
    scored = [r["prompt"] + " " + r["target_new"] for r in recs] + [r["locality_prompt"] for r in recs]
    tok.padding_side = "left"
    single = [tok(t, return_tensors="pt") for t in scored]
    batches = [tok(scored[i:i + 16], return_tensors="pt", padding=True) for i in range(0, len(scored), 16)]
    prompts = [tok(r["prompt"], return_tensors="pt") for r in recs[:8]] + \
              [tok(r["locality_prompt"], return_tensors="pt") for r in recs[:8]]

    def teacher(items):
        def run():
            tokens = 0
            with torch.no_grad():
                for item in items:
                    model(**item, use_cache=False)
                    tokens += int(item["attention_mask"].sum())
            return tokens
        return run

    def generate():
        tokens = 0
        with torch.no_grad():
            for item in prompts:
                out = model.generate(**item, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
                tokens += out.shape[1] - item["input_ids"].shape[1]
        return tokens

    return {"teacher-forced, batch 1": teacher(single), "teacher-forced, batch 16": teacher(batches),
            "generate, batch 1, 32 new": generate}


def tokens_per_second(run, repeats: int, before=None) -> float:
    best = 0.0
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        tokens = run()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", help="hparam overrides key=value")
    args = parser.parse_args(argv)

    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    from memoe_plugin.smollm2 import load_smollm2

    model, tok = load_smollm2()
    config = yaml.safe_load((REPO / "hparams/MEMoE/smollm2-135m.yaml").read_text())
    config.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set or [])})
    config.update(steps=1, early_stop=False)
    hparams = MEMoEHyperParams.from_dict(config)
    recs = records(args.edits)
    runs = workloads(model, tok, recs)

    base_1 = {name: tokens_per_second(run, args.repeats) for name, run in runs.items()}
    _, restore = apply_memoe_to_model(model, tok, recs, hparams)
    adapter = get_adapter(model)

    def cold_cache():
        adapter.encoder._entity_runs.clear()
        if adapter.guard is not None:
            adapter.guard._cache.clear()

    edited = {name: tokens_per_second(run, args.repeats, cold_cache) for name, run in runs.items()}
    restore()
    base_2 = {name: tokens_per_second(run, args.repeats) for name, run in runs.items()}

    print(f"SmolLM2-135M, CPU threads={torch.get_num_threads()}, {len(recs)} edits, "
          f"routing={hparams.routing_input}, guard={hparams.locality_guard}")
    print(f"{'workload':28s} {'base tok/s':>11s} {'edited tok/s':>13s} {'overhead':>9s}   (base runs: first, last)")
    for name in runs:
        base = (base_1[name] + base_2[name]) / 2
        overhead = (base / edited[name] - 1) * 100
        print(f"{name:28s} {base:11.1f} {edited[name]:13.1f} {overhead:8.1f}%   ({base_1[name]:.1f}, {base_2[name]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
