"""MEMoE on ZsRE / CounterFact without EasyEdit: quality, routing agreement and time, in one process.

    OMP_NUM_THREADS=1 python benchmarks/quality/direct_edit.py [--data zsre] [--num-edits 30] [--batch-size 30] \
        [--hparams hparams/MEMoE/smollm2-135m.yaml] [--set gate_norm=center gate_token_weight=0.1]

Edits the first ``--num-edits`` records in chunks of ``--batch-size`` that accumulate
(sequential batch editing; one chunk is the batch protocol), then prints one JSON line:

* ``rel`` / ``gen``: teacher-forced token accuracy of ``target_new`` after the prompt /
  the rephrase, averaged over edits (EasyEdit's ``rewrite_acc`` / ``rephrase_acc`` for
  ZsRE compute the same thing; the tuned file gives 100.0 / 88.4 here and through
  EasyEdit). Locality is not computed: use benchmarks/easyedit_batch.py for it;
* ``agree``: share of edits whose rephrase goes to the same top-1 expert as the edit
  prompt at the last prompt position; ``chance``: the same for a random pairing;
* ``experts``: how many edit prompts each expert takes; ``steps`` per chunk; ``edit_s``.

It is the quick loop used for tuning; the figures in docs/results.md that come from it
say so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch

from memoe_plugin import apply_memoe_to_model, get_adapter
from memoe_plugin.assets import memoe_hparams
from memoe_plugin.eval.metrics import token_accuracy
from memoe_plugin.eval.overrides import load_hparams
from memoe_plugin.eval.records import dataset_requests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre", choices=("zsre", "counterfact"))
    parser.add_argument("--data-file", help="default: the dataset's file in $MEMOE_DATA or $EASYEDIT_PATH/data")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=None, help="default: all edits in one chunk")
    parser.add_argument("--hparams", default=str(memoe_hparams("smollm2-135m")))
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hparams = load_hparams(args.hparams, args.set)
    requests = dataset_requests(args.data, args.data_file, limit=args.num_edits)
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hparams.model_name)
    tok.pad_token = tok.pad_token or tok.eos_token
    size = args.batch_size or len(requests)

    start, steps = time.perf_counter(), []
    for i in range(0, len(requests), size):
        apply_memoe_to_model(model, tok, requests[i:i + size], hparams)
        steps.append(get_adapter(model).last_report.steps)
    edit_seconds = time.perf_counter() - start

    adapter = get_adapter(model)
    last = lambda text: adapter.route(torch.tensor([tok(text)["input_ids"]]))[0, -1, 0].item()
    n = len(requests)
    rel = sum(token_accuracy(model, tok, r["prompt"], r["target_new"]) for r in requests) / n
    gen = sum(token_accuracy(model, tok, r["rephrase_prompt"], r["target_new"]) for r in requests) / n
    edit_experts = [last(r["prompt"]) for r in requests]
    rephrase_experts = [last(r["rephrase_prompt"]) for r in requests]
    agree = sum(a == b for a, b in zip(edit_experts, rephrase_experts)) / n
    chance = sum(edit_experts.count(e) * rephrase_experts.count(e) for e in set(edit_experts)) / n ** 2
    print(json.dumps({"data": args.data, "num_edits": n, "batch_size": size, "set": args.set,
                      "rel": round(100 * rel, 1), "gen": round(100 * gen, 1), "agree": round(agree, 3),
                      "chance": round(chance, 3), "experts": dict(sorted(Counter(edit_experts).items())),
                      "steps": steps, "edit_s": round(edit_seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
