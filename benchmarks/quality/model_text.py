"""What the model writes when ``rewordings`` and ``aliases`` ask it, on DEV records: candidates and what is kept.

    MEMOE_DATA=../shared/data python benchmarks/quality/model_text.py --data counterfact --num-edits 20 [--aliases]

For each record: the candidates that pass the text filter (``training.rewordings.cleaned`` /
``training.aliases.cleaned_alias``), then those the next-token check keeps. Prints one JSON line per record and a
last line with the counts. Reads only the dev split's edit prompts and subjects.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from memoe_plugin.eval.data import data_file
from memoe_plugin.eval.overrides import load_hparams
from memoe_plugin.eval.splits import select
from memoe_plugin.training import aliases, rewordings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="counterfact", choices=("counterfact", "counterfact-knowedit", "zsre-knowedit"))
    parser.add_argument("--num-edits", type=int, default=20)
    parser.add_argument("--aliases", action="store_true", help="ask for other names of the subject instead")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = load_hparams(args.hparams, [])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(hp.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hp.model_name)
    records = [{k: r[k] for k in ("prompt", "subject", "target_new")}
               for r in select(json.loads(data_file(args.data).read_text()), "dev")][:args.num_edits]
    chat = bool(getattr(tok, "chat_template", None))
    module, clean = (aliases, aliases.cleaned_alias) if args.aliases else (rewordings, rewordings.cleaned)
    asked = module.asking_texts(tok, [r["subject" if args.aliases else "prompt"] for r in records], chat)
    drafts = rewordings.sample_candidates(model, tok, asked, hp.ask_samples, hp.seed,
                                          max_new_tokens=12 if args.aliases else 32)
    kept = (aliases.model_aliases if args.aliases else rewordings.model_rewordings)(
        model, tok, records, 2, hp.ask_samples, hp.seed, chat)
    passed = 0
    for record, candidates, chosen in zip(records, drafts, kept):
        filtered = sorted({c for c in (clean(text, record) for text in candidates) if c})
        passed += bool(filtered)
        print(json.dumps({"prompt": record["prompt"], "subject": record["subject"], "past_the_text_filter": filtered,
                          "kept": chosen}))
    print(json.dumps({"records": len(records), "with_a_candidate_past_the_text_filter": passed,
                      "kept_per_edit": round(sum(map(len, kept)) / len(records), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
