"""Inference cost of a MEMoE-edited SmolLM2-135M next to the base model, measured in one run.

    python benchmarks/perf/inference_overhead.py [--edits 30] [--rounds 3] [--set locality_guard=false]
        [--synthetic 10000] [--synthetic-anti 4]

The adapter is trained on ZsRE edits (the file found as memoe-compare finds it:
$MEMOE_DATA or the EasyEdit checkout; else the built-in examples)
with a single step: its experts are non-zero, so every routed token pays for
its expert, and anchors are computed in every forward. Every item (one prompt, one
batch, one generate call) is timed on the base model and on the edited one back to
back, in alternating order (the adapter is detached and re-attached between them,
outside the timing), so that drifts in machine speed hit both alike. The overhead is
total base tokens/s over total edited tokens/s, minus 1.
Workloads: teacher-forced scoring of prompt + answer (batch 1 and batch 16,
left-padded, as EasyEdit scores), and greedy ``generate`` (batch 1, 32 new tokens).
The anchor caches start empty for each edited pass.

``--synthetic N`` adds N synthetic edits after the real ones, to measure what N more edits cost at
inference (a load test: they are never trained). Each is shaped as the real edits are (``add_synthetic``): an
invented subject (memoe_plugin.eval.synthetic, in the locality guard), as many random keys (and snap inputs) of the
same kinds as the real edits have on average, as many kept anti-keys (stop keys; ``--synthetic-anti`` overrides
the count) and, with prototype anti-keys, a subject vector; their experts go round the existing ones. The prompts name only the real edits' subjects and unrelated ones,
as a user's prompts would among 100,000 edits. The script also prints the adapter's bytes.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch



def records(n: int) -> list[dict]:
    from memoe_plugin.eval.records import dataset_requests
    return [r for r in dataset_requests("zsre", limit=n, examples_if_missing=True) if r.get("locality_prompt")]


def workloads(model, tok, recs) -> dict:
    """name -> list of (callable running one item, returning its token count)."""
    scored = [r["prompt"] + " " + r["target_new"] for r in recs] + [r["locality_prompt"] for r in recs]
    tok.padding_side = "left"
    single = [tok(t, return_tensors="pt") for t in scored]
    batches = [tok(scored[i:i + 16], return_tensors="pt", padding=True) for i in range(0, len(scored), 16)]
    prompts = [tok(r["prompt"], return_tensors="pt") for r in recs[:8]] + \
              [tok(r["locality_prompt"], return_tensors="pt") for r in recs[:8]]

    def teacher(item):
        def run():
            with torch.no_grad():
                model(**item, use_cache=False)
            return int(item["attention_mask"].sum())
        return run

    def generate(item):
        def run():
            with torch.no_grad():
                out = model.generate(**item, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            return out.shape[1] - item["input_ids"].shape[1]
        return run

    return {"teacher-forced, batch 1": [teacher(i) for i in single],
            "teacher-forced, batch 16": [teacher(b) for b in batches],
            "generate, batch 1, 32 new": [generate(p) for p in prompts]}


@torch.no_grad()
def add_synthetic(adapter, count: int, anti_per_edit=None, seed: int = 0, chunk: int = 20_000) -> None:
    """``count`` untrained edits after the real ones, shaped as the real ones are: invented subjects in the guard, as
    many random keys per edit as the real edits have (of the same kinds: plain, the chat template's, the reply's),
    as many kept anti-keys per edit (stop keys, or the relation bank's: ``anti_per_edit`` overrides the count) and,
    with prototype anti-keys, one random subject vector each."""
    from memoe_plugin.eval.synthetic import invented_subject
    from memoe_plugin.routing.scope import NO_FLOOR
    scope, guard = adapter.scope, adapter.guard
    if scope is None or guard is None:
        raise SystemExit("--synthetic needs the key scope and the locality guard (the shipped file has both)")
    generator = torch.Generator().manual_seed(seed)
    first = guard.edit_count
    per_edit = max(1, round(len(scope) / max(first, 1)))
    anti = round(scope.anti_keys.shape[0] / max(first, 1)) if anti_per_edit is None else anti_per_edit
    subjects = scope.subjects.shape[0] > 0
    dim, input_dim = scope.center.shape[0], scope.inputs.shape[1]
    for lo in range(0, count, chunk):
        n = min(chunk, count - lo)
        ids = torch.arange(first + lo, first + lo + n)
        for edit in ids.tolist():
            guard.add([invented_subject(edit)], edit)
        keys = torch.randn(n * per_edit, dim, generator=generator)
        inputs = torch.randn(n * per_edit, input_dim, generator=generator) if scope.snap > 0 else None
        kinds = scope.key_kind[torch.randint(len(scope), (n * per_edit,), generator=generator)]
        scope.add(keys, ids.repeat_interleave(per_edit), inputs, kind=kinds)
        if anti:
            rows = torch.randn(n * anti, dim, generator=generator)
            scope.add_anti_keys(rows, ids.repeat_interleave(anti), torch.full((n * anti,), NO_FLOOR))
        if subjects:
            skip = scope.subject_skip[torch.randint(scope.subject_skip.shape[0], (n,), generator=generator)]
            scope.add_subjects(torch.randn(n, dim, generator=generator), ids, skip)
    router = adapter.bypass.router
    if router is not None:
        router.assign(first, count, 0, adapter.bypass.experts.shape[0])


def timed(run) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", nargs="*", help="hparam overrides key=value")
    parser.add_argument("--synthetic", type=int, default=0, help="untrained synthetic edits added after the real ones")
    parser.add_argument("--synthetic-anti", type=int, default=None,
                        help="kept anti-keys per synthetic edit (default: as many as the real edits keep)")
    args = parser.parse_args(argv)

    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.assets import memoe_hparams
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.assets.smollm2 import load_smollm2

    model, tok = load_smollm2()
    hparams = load_hparams(memoe_hparams("smollm2-135m"), args.set, steps=1, early_stop=False)
    recs = records(args.edits)
    runs = workloads(model, tok, recs)
    for items in runs.values():   # warm-up: allocator, kernels
        for run in items:
            run()
    _, restore = apply_memoe_to_model(model, tok, recs, hparams)
    adapter = get_adapter(model)
    if args.synthetic:
        start = time.perf_counter()
        add_synthetic(adapter, args.synthetic, args.synthetic_anti)
        print(f"added {args.synthetic} synthetic edits in {time.perf_counter() - start:.1f} s")
    held, keys = adapter.kept_bytes, len(adapter.scope or ())
    adapter.detach()

    def edited(run):
        adapter.encoder._entity_runs.clear()   # every prompt is new to the anchor caches
        if adapter.guard is not None:
            adapter.guard._cache.clear()
        adapter.reattach()
        try:
            return timed(run)
        finally:
            adapter.detach()

    totals = {name: {"base": [0, 0.0], "edited": [0, 0.0]} for name in runs}
    flip = False
    for _ in range(args.rounds):
        for name, items in runs.items():
            for run in items:   # base and edited back to back, in alternating order: drift cancels
                flip = not flip
                for which in (("base", "edited") if flip else ("edited", "base")):
                    tokens, seconds = timed(run) if which == "base" else edited(run)
                    totals[name][which][0] += tokens
                    totals[name][which][1] += seconds
    adapter.reattach()
    restore()

    edits = len(recs) + args.synthetic
    print(f"adapter: {edits} edits, {keys} keys, {held / 2**20:.1f} MiB ({held / edits / 1024:.1f} KiB per edit)")
    print(f"SmolLM2-135M, CPU threads={torch.get_num_threads()}, {len(recs)} edits + {args.synthetic} synthetic, "
          f"routing={hparams.routing_input}, guard={hparams.locality_guard}, {args.rounds} rounds; base and "
          "edited alternate item by item; anchor caches emptied before every edited item")
    print(f"{'workload':28s} {'base tok/s':>11s} {'edited tok/s':>13s} {'overhead':>9s}")
    for name, t in totals.items():
        base, edit = t["base"][0] / t["base"][1], t["edited"][0] / t["edited"][1]
        print(f"{name:28s} {base:11.1f} {edit:13.1f} {(base / edit - 1) * 100:8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
