"""What a component at the subject's own positions would buy, measured before building it (issue 52, item 3).

    MEMOE_DATA=../shared/data python benchmarks/quality/subject_component.py --layer 21 --num-edits 40 \
        [--norm 1.0] [--steps 40] [--also-last]

The key scope puts the bypass at the positions that predict the answer. ROME-style editors write the fact where
later layers read the subject: the subject's last token. This script measures that alternative on the DEV split
without the adapter: for each edit alone, one vector ``delta`` is added to the output of the projection the recipe
wraps (``module_template`` at ``--layer``) at the subject's last token, optimised so that the edit prompt predicts
``target_new`` (teacher forcing, Adam), with its norm bounded by ``--norm`` times the mean norm of that projection's
output there. The same vector is then added at the subject's last token of

* CounterFact's paraphrase prompts (an unrelated sentence, then the fact reworded; dataset ``counterfact``) and its
  generation prompts, reported apart: the target's teacher-forced token accuracy;
* KnowEdit wiki_counterfact's same-subject questions (``Relation_Specificity``): share of answer tokens whose argmax
  is unchanged; and its portability prompts by part: teacher-forced accuracy of their answer.

``--also-last`` adds a second vector at the prompt's last token (what the key scope edits today) trained jointly, to
see what the pair does. Each edit is scored alone (no batch, no scope), so this is an upper bound on what the
position can carry, and a lower bound on what it costs other facts of the subject. Prints one JSON line per setting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from memoe_plugin.eval.data import data_file
from memoe_plugin.eval.metrics import is_paraphrase_prompt
from memoe_plugin.eval.overrides import load_hparams
from memoe_plugin.eval.splits import select


def subject_last(tok, prompt: str, subject: str):
    """Index of the subject's last token in ``prompt`` (its last mention), or None when it is not there."""
    at = prompt.rfind(subject)
    if at < 0:
        return None
    enc = tok(prompt, return_offsets_mapping=True)
    end = at + len(subject)
    last = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > at]
    return last[-1] if last else None


class Shift:
    """Adds vectors to a module's output at given positions of a one-row batch, while set."""

    def __init__(self, module):
        self.items = []   # (position, vector)
        module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if not self.items:
            return output
        output = output.clone()
        for position, vector in self.items:
            if position is not None and position < output.shape[1]:
                output[0, position] = output[0, position] + vector.to(output.dtype)
        return output


def target_ids(tok, prompt, target):
    full = tok(prompt + " " + target)["input_ids"]
    n = len(tok(prompt)["input_ids"])
    return torch.tensor([full]), n


def token_accuracy(model, tok, prompt, target):
    ids, n = target_ids(tok, prompt, target)
    with torch.no_grad():
        logits = model(ids).logits[0]
    pred = logits[n - 1:-1].argmax(-1)
    return (pred == ids[0, n:]).float().mean().item(), pred


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=None, help="default: the recipe's layer")
    parser.add_argument("--num-edits", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--norm", type=float, default=1.0)
    parser.add_argument("--also-last", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = load_hparams(args.hparams, [])
    layer = hp.layer if args.layer is None else args.layer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(hp.model_name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hp.model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    module = model.get_submodule(hp.module_template.format(layer))
    shift = Shift(module)
    sizes = []
    module.register_forward_hook(lambda m, a, o: sizes.append(o.detach()[0].norm(dim=-1).mean().item()) if not shift.items else None)

    def edit(prompt, subject, target):
        """The vector(s) that make ``prompt`` predict ``target``: (subject vector, last-token vector or None)."""
        ids, n = target_ids(tok, prompt, target)
        s = subject_last(tok, prompt, subject)
        sizes.clear()
        with torch.no_grad():
            model(ids)
        bound = args.norm * sizes[-1]
        vs = torch.zeros(model.config.hidden_size, requires_grad=True)
        vl = torch.zeros(model.config.hidden_size, requires_grad=True) if args.also_last else None
        params = [vs] + ([vl] if vl is not None else [])
        opt = torch.optim.Adam(params, lr=args.lr * bound / (model.config.hidden_size ** 0.5))
        for _ in range(args.steps):
            shift.items = [(s, vs)] + ([(n - 1, vl)] if vl is not None else [])
            logits = model(ids).logits[0, n - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits, ids[0, n:])
            if (logits.argmax(-1) == ids[0, n:]).all() and loss.item() < 0.5:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for v in params:
                    v.mul_(min(1.0, bound / (v.norm().item() + 1e-9)))
        shift.items = []
        return vs.detach(), None if vl is None else vl.detach()

    def with_edit(vectors, prompt, subject, last=False):
        vs, vl = vectors
        n = len(tok(prompt)["input_ids"])
        shift.items = [(subject_last(tok, prompt, subject), vs)] + ([(n - 1, vl)] if last and vl is not None else [])

    first = lambda v: v[0] if isinstance(v, list) else v   # noqa: E731
    start = time.perf_counter()
    scores = {k: [] for k in ("reliability", "paraphrase", "generation_prompt", "same_subject", "port_alias",
                              "port_reasoning", "port_logical", "wikicf_reliability")}
    cf = [r for r in select(json.loads(data_file("counterfact").read_text()), "dev")
          if is_paraphrase_prompt(r["rephrase_prompt"], r["subject"]) is not None]
    paraphrase = [r for r in cf if is_paraphrase_prompt(r["rephrase_prompt"], r["subject"])][:args.num_edits]
    generation = [r for r in cf if not is_paraphrase_prompt(r["rephrase_prompt"], r["subject"])][:args.num_edits]
    for r in paraphrase + generation:
        vectors = edit(r["prompt"], r["subject"], r["target_new"])
        with_edit(vectors, r["prompt"], r["subject"], last=True)
        scores["reliability"].append(token_accuracy(model, tok, r["prompt"], r["target_new"])[0])
        with_edit(vectors, r["rephrase_prompt"], r["subject"])
        key = "paraphrase" if r in paraphrase else "generation_prompt"
        scores[key].append(token_accuracy(model, tok, r["rephrase_prompt"], r["target_new"])[0])
        shift.items = []
    wiki = [r for r in select(json.loads(data_file("counterfact-knowedit").read_text()), "dev")
            if (r.get("locality") or {}).get("Relation_Specificity")][:args.num_edits]
    parts = {"Subject_Aliasing": "port_alias", "Reasoning": "port_reasoning", "Logical_Generalization": "port_logical"}
    for r in wiki:
        same = [(c["prompt"], first(c["ground_truth"])) for c in r["locality"]["Relation_Specificity"]]
        before = {p: token_accuracy(model, tok, p, t)[1] for p, t in same}
        vectors = edit(r["prompt"], r["subject"], r["target_new"])
        with_edit(vectors, r["prompt"], r["subject"], last=True)
        scores["wikicf_reliability"].append(token_accuracy(model, tok, r["prompt"], r["target_new"])[0])
        for p, t in same:
            with_edit(vectors, p, r["subject"])
            after = token_accuracy(model, tok, p, t)[1]
            scores["same_subject"].append((after == before[p]).float().mean().item())
        for part, name in parts.items():
            for c in (r.get("portability") or {}).get(part, []):
                with_edit(vectors, c["prompt"], r["subject"])   # no subject in the prompt: nothing is added
                scores[name].append(token_accuracy(model, tok, c["prompt"], first(c["ground_truth"]))[0])
        shift.items = []
    mean = lambda v: round(100 * sum(v) / len(v), 1) if v else None   # noqa: E731
    print(json.dumps({"layer": layer, "norm": args.norm, "steps": args.steps, "also_last": args.also_last,
                      **{k: mean(v) for k, v in scores.items()}, "n": {k: len(v) for k, v in scores.items()},
                      "seconds": round(time.perf_counter() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
