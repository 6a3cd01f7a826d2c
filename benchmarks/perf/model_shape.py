"""MEMoE at the shapes users edit, without weights: edit time, peak memory and inference overhead.

    python benchmarks/perf/model_shape.py --shape llama2-7b --dtype bfloat16 --batches 30,100,1000   # on a GPU
    python benchmarks/perf/model_shape.py --shape llama-1b --batches 30 --threads 2                  # on a CPU
        [--baseline FT-M] [--set scope_anti_keys=none] [--device cuda]
    python benchmarks/perf/model_shape.py --shape llama3-8b --sequential 1000 --chunk 10 [--baseline FT-M]

A randomly initialised model is built from the configuration of the named shape (Llama-2-7B,
Llama-3-8B, or a 1B Llama for a CPU), with SmolLM2's tokenizer (so the vocabulary is 49,152, not the
real model's; every other dimension is the real one). The edits are synthetic facts: invented
subjects (memoe_plugin.eval.synthetic) with a relation of the project's relation bank and an answer drawn from
a fixed list. This is a load test of the code at that shape, not a quality claim: a random model
knows nothing, and the edits only have to be trained into it.

For each batch size it prints: MEMoE's edit seconds (one ``apply_memoe_to_model`` call with the
recipe's settings, ``hparams/MEMoE/llama-7b.yaml`` moved to the shape's depth), its peak memory above
the loaded model (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident memory on
a CPU), the teacher-forced accuracy of the edits, and the inference overhead (tokens per second of
the edited model against the unedited one, on prompts that name no edited subject and on prompts that
do). With ``--baseline FT-M`` EasyEdit's FT-M edits the same facts on the same model in the same run
(it needs ``EASYEDIT_PATH``), for its time and memory. ``--sequential N`` edits N synthetic facts in calls of
``--chunk`` with no rollback instead (the sequential file, ``llama-7b-sequential``: the recipe, whose keys keep their
outputs as values), printing the seconds per edit of every tenth of the stream, the peak memory, the adapter's bytes
(and, by part, the marginal bytes per edit over the stream's second half) and the inference overhead at the end, and
the accuracy of the first and last hundred edits after the last call. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

SHAPES = {   # the real models' configurations (hidden, intermediate, layers, heads, kv heads, context)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,   # a smoke test
                 num_key_value_heads=2, max_position_embeddings=256),
}
def peak_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device) -> int:
    """Start peak tracking now; return the memory in use (the baseline the peak is measured above)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tokens_per_second(model, tok, prompts, device, repeats: int = 3) -> float:
    import torch
    batch = tok(prompts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        model(**batch)                                   # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return repeats * int(batch["attention_mask"].sum()) / (time.perf_counter() - start)


def build(args, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batches", default="30", help="comma-separated batch sizes")
    parser.add_argument("--baseline", default="", help="FT-M: EasyEdit's FT-M on the same edits (EASYEDIT_PATH)")
    parser.add_argument("--set", nargs="*", default=[], help="MEMoE hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sequential", type=int, default=0, help="N synthetic edits in calls of --chunk, no rollback")
    parser.add_argument("--chunk", type=int, default=10)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.assets.smollm2 import export_smollm2
    from memoe_plugin.eval.metrics import token_accuracy
    from memoe_plugin.eval.overrides import load_hparams
    from memoe_plugin.eval.synthetic import synthetic_facts
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(str(export_smollm2()))
    tok.pad_token = tok.pad_token or tok.eos_token
    model, config = build(args, tok)
    depth = config.num_hidden_layers
    hp = load_hparams("llama-7b", args.set, layer=int(0.7 * depth), device=args.device,
                      model_name=f"random-{args.shape}", fp16=args.dtype == "float16")
    plain = [f"In the year {1900 + i}, the weather over the northern plains was" for i in range(8)]
    base_tps = tokens_per_second(model, tok, plain, device)
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "device": str(device),
                      "parameters": sum(p.numel() for p in model.parameters()), "layer": hp.layer,
                      "base_tokens_per_s": round(base_tps, 1), "set": args.set}), flush=True)
    if args.sequential:
        return sequential(args, model, tok, hp, device, plain, base_tps)
    for size in [int(b) for b in args.batches.split(",")]:
        edits = synthetic_facts(size)
        before = reset_peak(device)
        start = time.perf_counter()
        _, restore = apply_memoe_to_model(model, tok, edits, hp)
        seconds = time.perf_counter() - start
        peak = peak_bytes(device) - before
        adapter = get_adapter(model)
        sample = edits[:: max(1, size // 20)]
        accuracy = 100 * sum(token_accuracy(model, tok, e["prompt"], e["target_new"]) for e in sample) / len(sample)
        named = [e["prompt"] for e in edits[:8]]
        edited_plain = tokens_per_second(model, tok, plain, device)
        edited_named = tokens_per_second(model, tok, named, device)
        scope_bytes = adapter.scope.nbytes if adapter.scope is not None else 0
        steps, cached = adapter.last_report.steps, adapter.last_report.used_cached_activations
        restore()
        base_named = tokens_per_second(model, tok, named, device)
        print(json.dumps({"method": "MEMoE", "edits": size, "edit_seconds": round(seconds, 1),
                          "seconds_per_edit": round(seconds / size, 3), "peak_above_model_gib": round(peak / 2**30, 2),
                          "steps": steps, "fast_path": cached,   # trained on cached activations, or full passes
                          "accuracy_sample": round(accuracy, 1), "scope_bytes": scope_bytes,
                          "overhead_plain": round(1 - edited_plain / base_tps, 3),
                          "overhead_named": round(1 - edited_named / base_named, 3)}), flush=True)
        del adapter
        gc.collect()
        if args.baseline:
            print(json.dumps(run_baseline(args, model, tok, edits, device)), flush=True)
    return 0


def sequential(args, model, tok, hp, device, plain, base_tps) -> int:
    """``--sequential``: MEMoE's sequential settings on N synthetic edits in calls of ``--chunk``, no rollback."""
    from memoe_plugin import apply_memoe_to_model, get_adapter
    from memoe_plugin.eval.metrics import token_accuracy
    from memoe_plugin.eval.synthetic import synthetic_facts
    from memoe_plugin.persist.state import kept_bytes_by_part
    edits = synthetic_facts(args.sequential)
    halfway = None   # (edits, bytes by part) at the stream's middle: the bytes per edit are the marginal ones
    before = reset_peak(device)
    times, tenth, paths = [], max(args.chunk, args.sequential // 10), set()
    for lo in range(0, len(edits), args.chunk):
        start = time.perf_counter()
        _, restore = apply_memoe_to_model(model, tok, edits[lo:lo + args.chunk], hp)
        if device.type == "cuda":
            import torch
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        paths.add(get_adapter(model).last_report.used_cached_activations)
        if halfway is None and lo + args.chunk >= len(edits) // 2:
            halfway = (lo + args.chunk, kept_bytes_by_part(get_adapter(model)))
        if (lo + args.chunk) % tenth == 0:
            print(json.dumps({"method": "MEMoE", "edits": lo + args.chunk,
                              "seconds_per_edit_last_tenth": round(sum(times[-tenth // args.chunk:]) / tenth, 3)}),
                  flush=True)
    peak = peak_bytes(device) - before
    adapter = get_adapter(model)
    first, last = edits[:100], edits[-100:]
    accuracy = {name: round(100 * sum(token_accuracy(model, tok, e["prompt"], e["target_new"]) for e in part)
                            / len(part), 1) for name, part in (("first_100", first), ("last_100", last))}
    edited_plain = tokens_per_second(model, tok, plain, device)
    kept, parts = adapter.kept_bytes, kept_bytes_by_part(adapter)
    span = len(edits) - halfway[0]
    per_edit = {part: round((parts.get(part, 0) - halfway[1].get(part, 0)) / span) for part in parts} if span else {}
    restore()
    print(json.dumps({"method": "MEMoE", "edits": len(edits), "chunk": args.chunk, "edit_seconds": round(sum(times), 1),
                      "seconds_per_edit": round(sum(times) / len(edits), 3),
                      "last_over_first_tenth": round(sum(times[-tenth // args.chunk:]) /
                                                     sum(times[:tenth // args.chunk]), 2),
                      "peak_above_model_gib": round(peak / 2**30, 2), "kept_bytes": kept,
                      "fast_path": sorted(paths),   # [True]: every call trained on cached activations
                      "kept_bytes_per_edit_by_part": per_edit,
                      "kept_bytes_per_edit": sum(v for k, v in per_edit.items() if k != "shared"),
                      "overhead_plain": round(1 - edited_plain / base_tps, 3), **accuracy}), flush=True)
    if args.baseline:
        for name in args.baseline.split(","):
            print(json.dumps(run_baseline(args, model, tok, edits, device, name, chunk=args.chunk)), flush=True)
    return 0


def run_baseline(args, model, tok, edits, device, name=None, chunk: int = 0) -> dict:
    """An EasyEdit method (``--baseline``: FT-M, UltraEdit, ...) on the same model and edits, through its apply function as
    BaseEditor calls it, with its shipped compare file moved to the shape's depth; in calls of ``chunk`` with no
    rollback between them (0: one call). The model's weights are put back afterwards."""
    import memoe_plugin
    memoe_plugin.register(os.environ.get("EASYEDIT_PATH"))
    import easyeditor
    import torch
    import yaml
    from easyeditor.util.alg_dict import ALG_DICT
    from memoe_plugin.assets import compare_hparams_dir
    from memoe_plugin.eval.compare.methods import METHODS
    name = name or args.baseline
    spec = METHODS[name]
    config = yaml.safe_load((compare_hparams_dir("smollm2-135m") / f"{name}.yaml").read_text())
    depth = model.config.num_hidden_layers
    config.update(device=args.device, model_name=f"random-{args.shape}")
    if "layers" in config:   # moved to the same relative depth as on SmolLM2 (30 layers)
        config["layers"] = sorted({min(depth - 1, round(layer * depth / 30)) for layer in config["layers"]})
    cls = getattr(easyeditor, spec.hparams_class)
    hp = cls(**{k: v for k, v in config.items() if k in cls.__dataclass_fields__})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    requests = [dict(e) for e in edits]   # EasyEdit HEAD's FT reads target_new as a string, like every method
    before = reset_peak(device)
    start = time.perf_counter()
    step = chunk or len(requests)
    for lo in range(0, len(requests), step):
        model, _ = ALG_DICT[spec.alg_name](model, tok, requests[lo:lo + step], hp, copy=False,
                                           return_orig_weights=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device) - before
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {"method": name, "edits": len(edits), "chunk": chunk, "edit_seconds": round(seconds, 1),
            "seconds_per_edit": round(seconds / len(edits), 3), "peak_above_model_gib": round(peak / 2**30, 2)}


if __name__ == "__main__":
    sys.exit(main())
