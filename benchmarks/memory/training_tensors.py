"""What one edit call holds while it trains, tensor by tensor, per edit: the captures and the training stacks.

    MEMOE_DATA=../shared/data python benchmarks/memory/training_tensors.py --edits 120 [--set key=value ...]

Builds what ``train_experts`` builds before its first step (the key registration's captures, then one fast-path
stack per bucket) for N ZsRE test edits on SmolLM2, and prints the bytes of each kind of tensor the stacks keep
(storages counted once: a view keeps its whole storage alive), in MiB and per edit. It does not train.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=120)
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from memoe_plugin import MEMoEAdapter
    from memoe_plugin.apply import training_variants
    from memoe_plugin.eval.data import data_file
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.eval.records import normalise_record
    from memoe_plugin.eval.splits import select
    from memoe_plugin.eval.validate import check_records
    from memoe_plugin.training.batches import build_edit_batches
    from memoe_plugin.training.fast_path import bucket_logits_functions
    from memoe_plugin.training.scope_keys import register_keys
    torch.set_num_threads(args.threads)
    hp = load_hparams(args.hparams, args.set)
    raw = select(json.loads(data_file("zsre-knowedit").read_text()), "test")
    records = [normalise_record(r, i) for i, r in enumerate(raw)]
    usable, _ = check_records(records)
    requests = [dict({k: records[i][k] for k in ("prompt", "target_new", "subject")}, _edit=j)
                for j, i in enumerate(usable[:args.edits])]
    model = AutoModelForCausalLM.from_pretrained(hp.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hp.model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = MEMoEAdapter.attach(model, tok, hp)
    adapter.assign_experts(0, len(requests))
    adapter.register_knowledge(requests, 0)
    rows = training_variants(requests, hp, adapter.template)
    batches = build_edit_batches(tok, rows, "cpu", micro_batch=hp.train_micro_batch)
    known = register_keys(adapter, batches, rows, 0)
    functions, cached = bucket_logits_functions(adapter, batches, known)
    known.clear()
    seen: set = set()

    def storage_bytes(value) -> int:
        """Bytes of the storages behind the tensors in ``value`` not counted yet."""
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(value, (list, tuple)):
            return sum(storage_bytes(v) for v in value)
        if isinstance(value, dict):
            return sum(storage_bytes(v) for v in value.values())
        if hasattr(value, "layers"):   # a transformers cache
            return sum(storage_bytes([layer.keys, layer.values]) for layer in value.layers)
        if hasattr(value, "__dict__"):
            return sum(storage_bytes(v) for v in vars(value).values())
        return 0

    totals: dict = {}
    for function in functions:
        stack = getattr(function, "__self__", None)
        if stack is None:
            continue
        for name, value in (("cache", stack.cache), ("expert inputs", stack.where), ("layer inputs", stack.x),
                            ("hidden", stack.hidden), ("routing", stack.routing),
                            ("layer arguments", (stack.args, stack.kwargs))):
            totals[name] = totals.get(name, 0) + storage_bytes(value)
    print(json.dumps({"edits": len(requests), "rows": len(rows), "cached": cached,
                      "mib": {k: round(v / 2**20, 1) for k, v in totals.items()},
                      "kib_per_edit": {k: round(v / 1024 / len(requests)) for k, v in totals.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
