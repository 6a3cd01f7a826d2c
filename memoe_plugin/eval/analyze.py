"""memoe-analyze: how MEMoE routes edited knowledge (paper Section 5 style), without EasyEdit.

    memoe-analyze --data zsre --num-edits 30 [--batch-size 30] [--clusters 4] [--out DIR]

Edits the model with MEMoE (chunks of ``--batch-size`` accumulating in the same
experts, as sequential batch editing), then routes, at the last prompt position
(the one that predicts the first answer token), with ``get_adapter(model).route``:

* **same knowledge**: the fraction of edits whose rephrasing goes to the same
  top-1 expert as the edit prompt;
* **similar knowledge**: the edit prompts' hidden states at the input of the
  adapted layer, clustered with k-means; within each cluster, the fraction routed
  to the cluster's most common expert (size-weighted), next to the same number
  for random clusters of the same sizes (chance level);
* **expert utilisation**: how often each expert is chosen, at the last position
  of edit prompts, rephrasings and unrelated (locality) prompts, and over all
  tokens of the edit prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ..adapter import get_adapter
from ..apply import apply_memoe_to_model
from ..assets import memoe_hparams
from ..hparams import MEMoEHyperParams
from .data import DataNotFoundError, data_file
from .overrides import parse_assignments
from .records import load_requests

DEFAULT_HPARAMS = memoe_hparams("smollm2-135m")
DATASETS = ("zsre", "counterfact", "zsre-knowedit", "counterfact-knowedit")


# ----------------------------------------------------------------------------- statistics (pure)
def kmeans(points: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Cluster labels of ``points`` [n, d] with k-means++ initialisation (deterministic for a seed)."""
    n = points.shape[0]
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(seed)
    x = points.double()
    centres = [x[torch.randint(n, (1,), generator=generator).item()]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        if float(dist.sum()) == 0.0:
            centres.append(x[torch.randint(n, (1,), generator=generator).item()])
            continue
        centres.append(x[torch.multinomial(dist / dist.sum(), 1, generator=generator).item()])
    centres = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centres[c] = members.mean(dim=0)
    return labels


def agreement(groups: Sequence[int], experts: Sequence[int]) -> float:
    """Size-weighted fraction of each group routed to the group's most common expert."""
    by_group: dict[int, list[int]] = {}
    for g, e in zip(groups, experts):
        by_group.setdefault(int(g), []).append(int(e))
    total = sum(len(v) for v in by_group.values())
    return sum(Counter(v).most_common(1)[0][1] for v in by_group.values()) / total if total else math.nan


def chance_agreement(groups: Sequence[int], experts: Sequence[int], trials: int = 200, seed: int = 0) -> float:
    """``agreement`` for random groups of the same sizes (a permutation baseline)."""
    generator = torch.Generator().manual_seed(seed)
    groups = list(groups)
    values = []
    for _ in range(trials):
        perm = torch.randperm(len(groups), generator=generator).tolist()
        values.append(agreement([groups[i] for i in perm], experts))
    return sum(values) / len(values) if values else math.nan


def utilisation(experts: Sequence[int], num_experts: int) -> dict:
    counts = Counter(int(e) for e in experts if int(e) >= 0)
    total = sum(counts.values())
    shares = [counts.get(e, 0) / total if total else 0.0 for e in range(num_experts)]
    entropy = -sum(p * math.log(p) for p in shares if p > 0)
    return {"counts": [counts.get(e, 0) for e in range(num_experts)], "shares": shares,
            "normalised_entropy": entropy / math.log(num_experts) if num_experts > 1 else 1.0}


# ----------------------------------------------------------------------------- model side
def last_expert(model, tokenizer, prompt: str) -> int:
    ids = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    routing = get_adapter(model).route(ids["input_ids"].to(device), ids["attention_mask"].to(device))
    return int(routing[0, -1, 0])


def all_token_experts(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    routing = get_adapter(model).route(ids["input_ids"].to(device), ids["attention_mask"].to(device))
    return [int(e) for e in routing[0, :, 0].tolist()]


def layer_input_states(model, tokenizer, prompts: list[str], layer: int) -> torch.Tensor:
    """Hidden state at the last prompt position entering block ``layer`` (the adapted layer)."""
    device = next(model.parameters()).device
    states = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out = model(**ids, output_hidden_states=True, use_cache=False)
            states.append(out.hidden_states[layer][0, -1].float().cpu())
    return torch.stack(states)


def analyze(model, tokenizer, requests: list[dict], hparams: MEMoEHyperParams, clusters: int,
            seed: int = 0) -> dict:
    """Routing statistics of an edited model (the adapter must be attached)."""
    edit = [last_expert(model, tokenizer, r["prompt"]) for r in requests]
    rephrased = [(i, last_expert(model, tokenizer, r["rephrase_prompt"])) for i, r in enumerate(requests)
                 if r.get("rephrase_prompt")]
    local = [last_expert(model, tokenizer, r["locality_prompt"]) for r in requests if r.get("locality_prompt")]
    tokens = [e for r in requests for e in all_token_experts(model, tokenizer, r["prompt"])]
    states = layer_input_states(model, tokenizer, [r["prompt"] for r in requests], hparams.layer)
    groups = kmeans(states, clusters, seed=seed).tolist()
    # A rephrasing the bypass leaves alone (-1: out of scope or guarded) is not routed like its edit.
    same = [edit[i] == e and e >= 0 for i, e in rephrased]
    bypass = get_adapter(model).bypass
    # grows with edits_per_expert; with scope_values the experts are emptied after each call, and a position that
    # matched a closed key reports the expert that made its value
    experts = max(int(bypass.experts.shape[0]), bypass.router.needed_experts if bypass.router is not None else 0)
    return {
        "num_edits": len(requests), "num_experts": experts, "layer": hparams.layer,
        "routing_input": hparams.routing_input, "clusters": len(set(groups)),
        "same_knowledge": {"pairs": len(same), "same_top1_expert": sum(same) / len(same) if same else math.nan,
                           "chance": sum(p * p for p in utilisation(edit, experts)["shares"])},
        "similar_knowledge": {"within_cluster_agreement": agreement(groups, edit),
                              "random_cluster_agreement": chance_agreement(groups, edit, seed=seed),
                              "cluster_sizes": sorted(Counter(groups).values(), reverse=True)},
        "utilisation": {"edit_last": utilisation(edit, experts),
                        "rephrase_last": utilisation([e for _, e in rephrased], experts),
                        "locality_last": utilisation(local, experts),
                        "edit_all_tokens": utilisation(tokens, experts)},
        "experts": {"edit": edit, "rephrase": [e for _, e in rephrased], "cluster": groups},
    }


def markdown(result: dict, title: str) -> str:
    same, similar, util = result["same_knowledge"], result["similar_knowledge"], result["utilisation"]
    lines = [f"# MEMoE routing analysis: {title}", "",
             f"{result['num_edits']} edits, {result['num_experts']} experts at layer {result['layer']}, "
             f"routing input `{result['routing_input']}`; top-1 expert at the last prompt position.", "",
             "| measure | value | chance |", "|---|---|---|",
             f"| same knowledge: rephrase routed like its edit | {same['same_top1_expert']:.1%} | {same['chance']:.1%} |",
             f"| similar knowledge: within-cluster agreement ({result['clusters']} k-means clusters of "
             f"layer-input states, sizes {similar['cluster_sizes']}) | {similar['within_cluster_agreement']:.1%} | "
             f"{similar['random_cluster_agreement']:.1%} |", "",
             "Expert utilisation (share of top-1 choices; normalised entropy 1 = uniform):", "",
             "| inputs | " + " | ".join(f"expert {e}" for e in range(result["num_experts"])) + " | entropy |",
             "|---|" + "---|" * (result["num_experts"] + 1)]
    for name, key in (("edit prompts, last position", "edit_last"), ("rephrasings, last position", "rephrase_last"),
                      ("locality prompts, last position", "locality_last"),
                      ("edit prompts, all tokens", "edit_all_tokens")):
        u = util[key]
        lines.append(f"| {name} | " + " | ".join(f"{s:.0%}" for s in u["shares"])
                     + f" | {u['normalised_entropy']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoe-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the hparams' model_name)")
    parser.add_argument("--hparams", default=str(DEFAULT_HPARAMS))
    parser.add_argument("--set", action="append", default=[], metavar="key=value", dest="overrides")
    parser.add_argument("--data", choices=DATASETS, default="zsre")
    parser.add_argument("--data-file", help="default: the dataset's file in $MEMOE_DATA or the EasyEdit checkout")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--split", choices=("all", "dev", "test"), default="all",
                        help="which records (memoe_plugin.eval.splits); default all, in file order")
    parser.add_argument("--batch-size", type=int, default=30, help="edits per MEMoE call (chunks accumulate)")
    parser.add_argument("--clusters", type=int, help="k for k-means (default: num_experts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="write analysis.json and analysis.md here")
    return parser


def main(argv: Optional[Sequence[str]] = None, model_and_tokenizer=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.hparams).read_text())
    config.update(parse_assignments(args.overrides))
    if args.model:
        config["model_name"] = args.model
    hparams = MEMoEHyperParams.from_dict(config)
    try:
        path = data_file(args.data, args.data_file)
    except DataNotFoundError as err:
        print(f"memoe-analyze: error: {err}", file=sys.stderr)
        return 2
    from .splits import select
    requests = select(load_requests(path), args.split)[:args.num_edits]
    if model_and_tokenizer is None:
        from ..assets.models import load_model
        model_and_tokenizer = load_model(str(Path(hparams.model_name).expanduser()))
    model, tokenizer = model_and_tokenizer
    hparams.device = str(next(model.parameters()).device)
    start = time.perf_counter()
    restore = None
    for lo in range(0, len(requests), args.batch_size):
        _, restore = apply_memoe_to_model(model, tokenizer, requests[lo:lo + args.batch_size], hparams)
    seconds = time.perf_counter() - start
    try:
        result = analyze(model, tokenizer, requests, hparams, args.clusters or hparams.num_experts, args.seed)
    finally:
        restore()
    result.update(data=str(path), batch_size=args.batch_size, edit_seconds=seconds)
    text = markdown(result, f"{args.data} ({path.name})")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(result, indent=2))
        (out / "analysis.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
