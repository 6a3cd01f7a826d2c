"""Cost of the output memory's penalty per training step, against the number of scope keys kept.

    OMP_NUM_THREADS=1 python benchmarks/perf/memory_penalty.py [--keys 100,1000,4000] [--rows 2000]

A long sequential run keeps more scope keys with every edit (about 4 per ZsRE edit, 1.2 per
CounterFact edit). Each training step draws ``--batch`` stored rows and computes the bypass
output on them. Routed afresh at every step (``OutputMemory.loss`` without routes), every drawn
row is matched against every key, so the step grows with the edits kept. The trainer now routes
the rows once per edit call (``OutputMemory.routes_on``) and each step reads that. The script
builds one bypass of SmolLM2-135M's shape (576 -> 1536, the shipped down_proj) with random keys
and stored rows, times both ways per step, and checks that they give the same penalty.
"""
from __future__ import annotations

import argparse
import time

import torch


def build(keys: int, rows: int, experts: int, seed: int = 0):
    from memoe_plugin.layer import MoEBypass
    from memoe_plugin.routing.scope import KeyScope
    from memoe_plugin.training.memory import OutputMemory
    from memoe_plugin.variants.key_routing import KeyRouter
    from memoe_plugin.variants.scope import ScopeVariant

    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(576, 1536, bias=False)
    bypass = MoEBypass(base, 0, num_experts=experts, top_k=1, scale=1.0, gate_noise=0.0)
    with torch.no_grad():
        bypass.experts.normal_(std=0.02, generator=generator)
    inputs = torch.randn(keys, 576, generator=generator)
    scope = KeyScope(576, threshold=0.4, snap=1.0)
    scope.calibrate(inputs)
    edits = keys // 4
    scope.add(inputs, torch.arange(keys) % edits)
    bypass.scope, bypass.router = ScopeVariant(scope), KeyRouter()
    bypass.router.expert_of = torch.arange(edits) * experts // edits    # one expert per block of edits
    memory = OutputMemory(capacity=rows)
    stored = inputs[torch.randint(keys, (rows,), generator=generator)] + 0.1 * torch.randn(rows, 576,
                                                                                          generator=generator)
    memory.add(stored, None, torch.randn(rows, 1536, generator=generator))
    return bypass, memory


def per_step(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="100,1000,4000", help="scope key counts to time, comma-separated")
    parser.add_argument("--rows", type=int, default=2000, help="rows in the output memory")
    parser.add_argument("--batch", type=int, default=1024, help="rows drawn per step (memory_batch)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    print(f"rows {args.rows}, drawn per step {args.batch}, experts {args.experts}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'keys':>6} {'routed each step ms':>20} {'routed once ms':>15} {'routing once ms':>16} {'same penalty':>13}")
    for keys in (int(k) for k in args.keys.split(",")):
        bypass, memory = build(keys, args.rows, args.experts)
        learning = [args.experts - 1]
        start = time.perf_counter()
        routes = memory.routes_on(bypass, learning)
        once = (time.perf_counter() - start) * 1000
        rows = routes.rows

        def fresh():   # what a step cost before: match the drawn rows, then the experts
            index = rows[torch.randperm(len(rows))[:args.batch]]
            x = memory.x[index].float().unsqueeze(0)
            return bypass.mixture(x).delta[0]

        with torch.no_grad():
            torch.manual_seed(1)
            cached = memory.loss(bypass, args.batch, routes)
            torch.manual_seed(1)
            index = rows[torch.randperm(len(rows))[:args.batch]]
            now, old = bypass.mixture(memory.x[index].float().unsqueeze(0)).delta[0], memory.delta[index].float()
            expected = (now - old).pow(2).sum(-1).mean() / old.pow(2).sum(-1).mean()
            before = per_step(fresh, args.repeats)
            after = per_step(lambda: memory.loss(bypass, args.batch, routes), args.repeats)
        same = bool(torch.allclose(cached, expected, rtol=1e-5))
        print(f"{keys:>6} {before:>20.1f} {after:>15.1f} {once:>16.1f} {str(same):>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
