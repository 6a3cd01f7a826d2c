"""Quick tuning loop on the DEV split, without EasyEdit: reliability, generality and same-subject locality.

    MEMOE_DATA=../shared/data python benchmarks/quality/dev_loop.py --data zsre-knowedit --num-edits 60 \
        [--chunk 30] [--sequential] [--set layer=21 scope_keys=true] [--dtype bfloat16] [--chat] [--paraphrases]

For trying settings fast while tuning. It edits with ``apply_memoe_to_model`` and scores
with the same definitions EasyEdit uses (``memoe_plugin.eval.metrics.target_predictions``:
teacher-forced token accuracy of the target for reliability and generality; for locality,
the share of the answer tokens' argmax predictions unchanged from the unedited model), in
chunks of ``--chunk`` edits rolled back after each, or kept with ``--sequential`` and all
scored after the last. It only ever reads the dev split. Figures that are reported come from
memoe-compare (``scope_table.py``, ``ablations.py``), through EasyEdit itself.

KnowEdit records are also scored on their portability prompts, by part (``port_alias``, ``port_reasoning``,
``port_logical``: teacher-forced token accuracy of the answer, as EasyEdit's ``portability_acc``).

``--chat`` also asks through the tokenizer's chat template (``memoe_plugin.eval.generation.chat_scores``): the
edit prompt and its rephrasing (the reply contains the new answer), the edit prompt behind a system prompt of the
user's own and after an earlier exchange (``CHAT_SYSTEM``, ``CHAT_HISTORY``), and one same-subject prompt and one
unrelated prompt (another record's edit prompt) per edit (the reply is the unedited model's). ``--paraphrases`` keeps only
records whose rephrasing puts a sentence of other text before the fact (CounterFact's paraphrase prompts,
``memoe_plugin.eval.metrics.is_paraphrase_prompt``). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from memoe_plugin import apply_memoe_to_model, get_adapter
from memoe_plugin.eval.data import data_file
from memoe_plugin.eval.generation import CHAT_HISTORY, CHAT_SYSTEM, chat_reply, contains_answer
from memoe_plugin.eval.metrics import is_paraphrase_prompt, target_predictions
from memoe_plugin.eval.overrides import load_hparams
from memoe_plugin.eval.splits import select
from memoe_plugin.eval.validate import check_records


# KnowEdit's portability parts, as memoe-compare names them
PORTABILITY_PARTS = {"Subject_Aliasing": "port_alias", "Reasoning": "port_reasoning",
                     "Logical_Generalization": "port_logical"}


def load(dataset: str, split: str) -> list[dict]:
    raw = select(json.loads(data_file(dataset).read_text()), split)
    first = lambda v: v[0] if isinstance(v, list) else v   # noqa: E731
    records = []
    for r in raw:
        same = (r.get("locality") or {}).get("Relation_Specificity") or []
        records.append({"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"],
                        "rephrase_prompt": r.get("rephrase_prompt"),
                        "same_subject": [(c["prompt"], first(c["ground_truth"])) for c in same],
                        "portability": {part: [(c["prompt"], first(c["ground_truth"])) for c in cases]
                                        for part, cases in (r.get("portability") or {}).items()}})
    usable, _ = check_records(records)
    return [records[i] for i in usable]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="zsre-knowedit",
                        choices=("zsre-knowedit", "counterfact-knowedit", "counterfact"))
    parser.add_argument("--num-edits", type=int, default=60)
    parser.add_argument("--chunk", type=int, default=30)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--set", nargs="*", default=[], help="hparam overrides key=value")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the base model's dtype (the experts train in float32 either way)")
    parser.add_argument("--chat", action="store_true", help="also score replies through the chat template")
    parser.add_argument("--subjects-step", type=int, default=1,
                        help="build the relation prototypes on every K-th of GENERIC_SUBJECTS only (for tuning their number)")
    parser.add_argument("--paraphrases", action="store_true",
                        help="only records whose rephrasing puts other text before the fact")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.subjects_step > 1:
        from memoe_plugin.routing import relations
        from memoe_plugin.training import prototypes
        relations.GENERIC_SUBJECTS = prototypes.GENERIC_SUBJECTS = relations.GENERIC_SUBJECTS[::args.subjects_step]
    pool = [r for r in load(args.data, "dev") if r["rephrase_prompt"] or args.data == "counterfact-knowedit"]
    records = [r for r in pool if not args.paraphrases or is_paraphrase_prompt(r["rephrase_prompt"], r["subject"])]
    records = records[:args.num_edits]
    unrelated = [r["prompt"] for r in pool if r not in records]   # other records' questions: other subjects
    hparams = load_hparams(args.hparams, args.set)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(hparams.model_name, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(hparams.model_name)

    def accuracy(prompt, target):
        predicted, wanted = target_predictions(model, tok, prompt, target)
        return sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)
    before = {pair: target_predictions(model, tok, *pair)[0] for r in records for pair in r["same_subject"]}
    scores = {"reliability": [], "generality": [], "same_subject": []}
    chat_asked = {}   # (kind, i) -> prompt whose reply must stay the unedited model's
    if args.chat:
        scores.update({"chat_edit": [], "chat_rephrase": [], "chat_same_subject_kept": [], "chat_unrelated_kept": [],
                       "chat_edit_own_system": [], "chat_edit_after_a_turn": []})
        for i, r in enumerate(records):
            if r["same_subject"]:
                chat_asked[("chat_same_subject_kept", i)] = r["same_subject"][0][0]
            if unrelated:
                chat_asked[("chat_unrelated_kept", i)] = unrelated[i % len(unrelated)]
        chat_before = {key: chat_reply(model, tok, prompt) for key, prompt in chat_asked.items()}

    def score(chunk, first):
        for i, r in enumerate(chunk, start=first):
            scores["reliability"].append(accuracy(r["prompt"], r["target_new"]))
            if r["rephrase_prompt"]:
                scores["generality"].append(accuracy(r["rephrase_prompt"], r["target_new"]))
            if args.chat:
                scores["chat_edit"].append(contains_answer(chat_reply(model, tok, r["prompt"]), r["target_new"]))
                scores["chat_edit_own_system"].append(contains_answer(
                    chat_reply(model, tok, r["prompt"], system=CHAT_SYSTEM), r["target_new"]))
                scores["chat_edit_after_a_turn"].append(contains_answer(
                    chat_reply(model, tok, r["prompt"], history=CHAT_HISTORY), r["target_new"]))
                if r["rephrase_prompt"]:
                    scores["chat_rephrase"].append(contains_answer(chat_reply(model, tok, r["rephrase_prompt"]),
                                                                   r["target_new"]))
                for key, prompt in chat_asked.items():
                    if key[1] == i:
                        scores[key[0]].append(float(chat_reply(model, tok, prompt) == chat_before[key]))
            for part, cases in r["portability"].items():
                scores.setdefault(PORTABILITY_PARTS.get(part, "port_" + part), []).extend(
                    accuracy(*case) for case in cases)
            for pair in r["same_subject"]:
                after = target_predictions(model, tok, *pair)[0]
                scores["same_subject"].append(sum(a == b for a, b in zip(after, before[pair])) / len(after))
    start, edit_seconds, steps, restore, kept = time.perf_counter(), 0.0, [], None, []
    reworded = aliased = 0
    for lo in range(0, len(records), args.chunk):
        chunk = records[lo:lo + args.chunk]
        t = time.perf_counter()
        _, restore = apply_memoe_to_model(model, tok, [{k: r[k] for k in ("prompt", "target_new", "subject")}
                                                       for r in chunk], hparams)
        edit_seconds += time.perf_counter() - t
        adapter = get_adapter(model)
        steps.append(adapter.last_report.steps)
        reworded += adapter.last_report.rewordings
        aliased += adapter.last_report.aliases
        if adapter.scope is not None and not args.sequential:   # the key scope's bytes for this chunk's edits
            kept.append(adapter.scope.nbytes / len(chunk))
        if not args.sequential:
            score(chunk, lo)
            restore()
    if args.sequential:   # everything the adapter keeps after the last call (what save_adapter writes), per edit
        kept.append(get_adapter(model).kept_bytes / len(records))
        score(records, 0)
        restore()
    mean = lambda v: round(100 * sum(v) / len(v), 1) if v else None   # noqa: E731
    print(json.dumps({"data": args.data, "split": "dev", "num_edits": len(records), "sequential": args.sequential,
                      "set": args.set, "subjects_step": args.subjects_step, "dtype": args.dtype, **{k: mean(v) for k, v in scores.items()},
                      "mean_steps": round(sum(steps) / len(steps), 1),
                      "rewordings_per_edit": round(reworded / len(records), 2),
                      "aliases_per_edit": round(aliased / len(records), 2), "edit_seconds": round(edit_seconds),
                      ("kept_bytes_per_edit" if args.sequential else "scope_bytes_per_edit"):
                          round(sum(kept) / len(kept)) if kept else None,
                      "seconds": round(time.perf_counter() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
