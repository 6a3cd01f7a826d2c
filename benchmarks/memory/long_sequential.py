"""Long sequential editing: N edits in batches into one MEMoE adapter; time and RSS per step.

    OMP_NUM_THREADS=1 python benchmarks/memory/long_sequential.py                      # tiny Llama, 1000 edits, batch 10
    python benchmarks/memory/long_sequential.py --model ~/.cache/memoe_plugin/smollm2-135m-llama \
        --hparams hparams/MEMoE/smollm2-135m.yaml --num-edits 200 [--steps 20]

Edit requests are synthetic: "The favourite colour of Person{i} is" -> a random word.
Each step is one ``apply_memoe_to_model`` call with ``--batch-size`` requests on the same
model (sequential editing: every call trains the same experts). After each step the
script records the wall time of the call and the process RSS (/proc/self/statm).

A table is printed every 10 steps, and at the end: total time, RSS at the first and last
step, the least-squares slope of RSS per step after ``--warmup`` steps, the adapter's own
parameter bytes, and PASS/FAIL on "no growth beyond the adapter's own parameters":

    PASS  iff  slope < --max-slope-mb (default 0.1 MB/step)

The adapter's tensors (and Adam's state, freed after every call) are allocated in the
first steps, so after warm-up nothing should grow but the bookkeeping that is meant to:
``adapter.edits`` (~0.2 KB per edit) and the anchor LRU caches (bounded by
``anchor_cache_size``; their entry counts are printed). 0.1 MB/step is well above that
(~0.03 MB/step for batch 10 on the tiny model) and well below anything that keeps a copy of
per-step tensors: for SmolLM2-135M one copy of the experts is 14 MB, so a per-step leak
of one expert copy, of the optimizer, or of the batch activations fails at once. On the
tiny model (34 KB of adapter parameters) the check is coarser; there the object-count test
in tests/test_reliability.py is the sharp one. At the end the model is restored and
checked bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch


WORDS = ["red", "blue", "green", "amber", "violet", "teal", "crimson", "ochre", "silver", "golden", "indigo",
         "scarlet", "olive", "maroon", "turquoise", "lavender", "beige", "coral", "navy", "ivory", "mint",
         "bronze", "charcoal", "saffron", "cobalt", "emerald", "ruby", "sapphire", "cream", "plum"]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic_requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"The favourite colour of Person{i} is", "target_new": rng.choice(WORDS)} for i in range(n)]


def tiny_model_and_tokenizer(seed: int):
    """A 4-layer random Llama and a byte-level BPE tokenizer trained in memory (no download)."""
    from memoe_plugin.assets.tiny import tiny_llama, train_tokenizer
    corpus = [f"The favourite colour of Person{i} is {w}." for i, w in enumerate(WORDS * 4)]
    corpus += ["The capital of France is Paris. Marie Curie was born in Warsaw.", "the a of in is was by to and"]
    tokenizer = train_tokenizer(corpus, padding_side="right")
    return tiny_llama(len(tokenizer), seed), tokenizer


def least_squares_slope(xs, ys) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def rewrite_accuracy(model, tokenizer, requests) -> float:
    """Teacher-forced accuracy of the target tokens, as EasyEdit scores rewrite_acc."""
    hits = total = 0
    for request in requests:
        full = tokenizer(request["prompt"] + " " + request["target_new"], return_tensors="pt")
        prompt_len = len(tokenizer(request["prompt"])["input_ids"])
        with torch.no_grad():
            predicted = model(**full).logits[0].argmax(-1)[prompt_len - 1:-1]
        wanted = full["input_ids"][0, prompt_len:]
        hits += int((predicted == wanted).sum())
        total += wanted.numel()
    return hits / max(total, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model directory (default: a tiny random Llama)")
    parser.add_argument("--hparams", help="YAML file (default with --model: hparams/MEMoE/smollm2-135m.yaml)")
    parser.add_argument("--num-edits", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, help="override hparams.steps (training steps per call)")
    parser.add_argument("--warmup", type=int, default=10, help="edit steps left out of the RSS slope")
    parser.add_argument("--max-slope-mb", type=float, default=0.1, help="PASS threshold, MB of RSS per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value, e.g. anchor_cache_size=0")
    parser.add_argument("--json", help="write per-step records and the summary here")
    args = parser.parse_args(argv)

    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    from memoe_plugin.assets import memoe_hparams
    from memoe_plugin.eval.overrides import parse_assignments

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model_dir = os.path.expanduser(args.model)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hparams = MEMoEHyperParams.from_hparams(args.hparams or memoe_hparams("smollm2-135m"))
        hparams.model_name = model_dir
    else:
        model, tokenizer = tiny_model_and_tokenizer(args.seed)
        hparams = MEMoEHyperParams.from_dict(dict(
            alg_name="MEMoE", model_name="tiny-llama", layer=2, module_template="model.layers.{}.mlp.down_proj",
            lr=5e-2, steps=20, anchor_backend="offline", early_stop=True))
    if args.steps:
        hparams.steps = args.steps
    if args.set:
        hparams = MEMoEHyperParams.from_dict({**hparams.to_dict(), **parse_assignments(args.set)})
    hparams.batch_size = args.batch_size
    requests = synthetic_requests(args.num_edits, args.seed)
    batches = [requests[i:i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    print(f"model: {args.model or 'tiny random Llama (4 layers, hidden 32)'}; layer {hparams.layer} "
          f"{hparams.module_name}; {len(requests)} edits in {len(batches)} steps of {args.batch_size}; "
          f"training steps per call <= {hparams.steps}; torch threads {torch.get_num_threads()}")
    header = f"{'step':>5} {'edits':>6} {'s/step':>8} {'RSS MB':>9} {'dRSS MB':>8} {'loss':>7} {'acc':>5}"
    print(header)
    records, restore, rss_start = [], None, rss_mb()
    start = time.perf_counter()
    for step, batch in enumerate(batches, 1):
        t0 = time.perf_counter()
        _, restore = apply_memoe_to_model(model, tokenizer, batch, hparams)
        seconds = time.perf_counter() - t0
        report = get_adapter(model).last_report
        records.append({"step": step, "edits": step * args.batch_size, "seconds": seconds, "rss_mb": rss_mb(),
                        "loss": report.final_loss, "acc": report.target_accuracy, "train_steps": report.steps})
        if step % 10 == 0 or step == len(batches):
            recent = records[-10:]
            print(f"{step:>5} {len(get_adapter(model).edits):>6} {sum(r['seconds'] for r in recent) / len(recent):>8.3f} "
                  f"{records[-1]['rss_mb']:>9.1f} {records[-1]['rss_mb'] - records[0]['rss_mb']:>+8.2f} "
                  f"{report.final_loss:>7.3f} {report.target_accuracy:>5.2f}", flush=True)
    total = time.perf_counter() - start

    adapter = get_adapter(model)
    param_bytes = sum(p.numel() * p.element_size() for p in adapter.bypass.trainable_parameters)
    after = records[args.warmup:] if len(records) > args.warmup + 1 else records
    slope = least_squares_slope([r["step"] for r in after], [r["rss_mb"] for r in after])
    acc_first = rewrite_accuracy(model, tokenizer, batches[0])
    acc_last = rewrite_accuracy(model, tokenizer, batches[-1])
    caches = {"entity_runs": len(adapter.encoder._entity_runs), "entity_vectors": len(adapter.encoder._entity_vectors),
              "capacity": hparams.anchor_cache_size}
    restore()
    state = model.state_dict()
    exact = list(state) == list(original) and all(torch.equal(state[k], original[k]) for k in original)
    passed = slope < args.max_slope_mb
    summary = {
        "edits": len(requests), "steps": len(batches), "batch_size": args.batch_size,
        "total_seconds": total, "seconds_per_step_mean": total / len(batches),
        "seconds_per_step_first10": sum(r["seconds"] for r in records[:10]) / len(records[:10]),
        "seconds_per_step_last10": sum(r["seconds"] for r in records[-10:]) / len(records[-10:]),
        "rss_before_mb": rss_start, "rss_first_step_mb": records[0]["rss_mb"], "rss_last_step_mb": records[-1]["rss_mb"],
        "rss_slope_mb_per_step": slope, "rss_slope_from_step": after[0]["step"],
        "adapter_param_bytes": param_bytes, "anchor_cache_entries": caches,
        "rewrite_acc_first_batch": acc_first, "rewrite_acc_last_batch": acc_last,
        "state_dict_restored_exactly": exact, "max_slope_mb": args.max_slope_mb, "pass": passed,
    }
    print()
    print(f"total time            {total:.1f} s  ({total / len(batches):.3f} s/step; first 10 steps "
          f"{summary['seconds_per_step_first10']:.3f}, last 10 {summary['seconds_per_step_last10']:.3f})")
    print(f"RSS                   before {rss_start:.1f} MB, first step {records[0]['rss_mb']:.1f} MB, "
          f"last step {records[-1]['rss_mb']:.1f} MB")
    print(f"RSS slope             {slope * 1024:+.2f} KB/step (least squares, steps {after[0]['step']}..{after[-1]['step']})"
          f"  = {slope * 1024 / args.batch_size:+.2f} KB/edit")
    print(f"adapter parameters    {param_bytes / 1024:.1f} KB (experts + gate, float32)")
    print(f"anchor caches         {caches['entity_runs']} id sequences, {caches['entity_vectors']} entity vectors "
          f"(capacity {caches['capacity']} each)")
    print(f"rewrite acc           first batch {acc_first:.2f}, last batch {acc_last:.2f} (after all {len(requests)} edits)")
    print(f"restore               state_dict bit-identical: {exact}")
    print(f"{'PASS' if passed else 'FAIL'}: RSS slope {slope:.4f} MB/step {'<' if passed else '>='} "
          f"{args.max_slope_mb} MB/step after warm-up (no growth beyond the adapter's own parameters)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    return 0 if passed and exact else 1


if __name__ == "__main__":
    sys.exit(main())
