"""Shared fakes and helpers of the memoe-compare tests (tests/test_eval_compare_*.py), not a test module.

The fake backend stands in for EasyEdit: its "model" is one parameter vector that
each edit changes, its scores say whether a prompt was edited, and its restore can
be told to fail. That is enough to check chunking, rollback checks, resume after
an interruption and a failing method without EasyEdit or a real model.

``data_folder`` (autouse) and ``tiny_setup`` are fixtures: a test module imports them by name
(``from compare_fakes import data_folder  # noqa: F401``) for pytest to use them there.
``tiny_setup`` and ``@easyedit`` are for the tests on EasyEdit with a tiny Llama (with EASYEDIT_PATH).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from memoe_plugin.eval import compare
from memoe_plugin.eval.compare import ResultStore, combine_restore, prepare_records

EASYEDIT_PATH = os.environ.get("EASYEDIT_PATH")


def fake_records(n):
    return [{"case_id": 100 + i, "prompt": f"Subject{i} lives in", "target_new": f"City{i}",
             "subject": f"Subject{i}", "ground_truth": f"Old{i}", "rephrase_prompt": f"Subject{i} resides in",
             "locality_prompt": f"Other{i} lives in", "locality_ground_truth": f"Town{i}"} for i in range(n)]


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8))


class FakeSession:
    def __init__(self, backend, run):
        self.backend, self.run = backend, run
        self.batchable = backend.batchable.get(run.method, True)
        self.model = FakeModel()
        self.known: set[str] = set()
        records = backend.records if backend.records is not None else fake_records(40)
        prepared = prepare_records(records, run.num_edits, run.split, run.seed, ("rephrase_prompt",),
                                   backend.strict)
        self.records, self.skipped = (prepared.edits, prepared.loc_prompts), prepared.skipped
        self.can_checkpoint = backend.checkpointable

    def generation_scores(self, model, request):
        hit = float(request["prompt"] in self.known)
        return {"rewrite": {"text": "x", "exact_match": hit, "token_f1": hit}}

    def wild_scores(self, model, request):
        hit = float(request["prompt"] in self.known)
        return {f"wild_{name}": {"text": "x", "exact_match": hit * (name == "rewrite")}
                for name in ("rewrite", "rewrite_instructed")}

    def probe(self, model, items):
        damaged = int(len(self.known) > self.backend.damage_after)
        return {"toy": [1 - damaged if i % 2 else 1 for i in range(len(items))]}

    def fluency(self, model):
        """Continuations that repeat themselves once the fake model is "damaged"; loss that grows with it."""
        damaged = int(len(self.known) > self.backend.damage_after)
        texts = ["a b a b a b" if damaged else "a b c d e f", "g h i j k l"]
        from memoe_plugin.eval.fluency import ngram_entropy
        return {"continuations": texts, "entropy": [ngram_entropy(t) for t in texts],
                "loss": [10.0 + 10.0 * damaged], "tokens": [10]}

    def save_checkpoint(self, path):
        path.write_text(json.dumps({"w": self.model.w.tolist(), "known": sorted(self.known)}))

    def load_checkpoint(self, path):
        saved = json.loads(path.read_text())
        with torch.no_grad():
            self.model.w.copy_(torch.tensor(saved["w"]))
        self.known = set(saved["known"])
        self.backend.loaded.append(path.name)
        return self.model, {"w": torch.zeros(8)}

    def describe(self):
        return {"file": "fake.yaml", "origin": "tuned by memoe-tune (2 trials, 30 zsre dev edits)"}

    def prepare(self, kwargs):
        return [{"prompt": p, "target_new": t, "rephrase_prompt": r,
                 "locality": {"neighborhood": {"prompt": lp, "ground_truth": lg}}}
                for p, t, r, lp, lg in zip(kwargs["prompts"], kwargs["target_new"], kwargs["rephrase_prompts"],
                                           kwargs["locality_inputs"]["neighborhood"]["prompt"],
                                           kwargs["locality_inputs"]["neighborhood"]["ground_truth"])]

    def evaluate(self, model, request):
        hit = float(request["prompt"] in self.known)
        damaged = int(len(self.known) > self.backend.damage_after)
        return {"rewrite_acc": [hit], "rephrase_acc": [hit], "locality": {"neighborhood_output": [[damaged]]}}

    def apply(self, requests, handle):
        groups = [requests] if self.batchable else [[r] for r in requests]
        for group in groups:
            self.backend.calls.append((self.run.method, [r["prompt"] for r in group]))
            count = len(self.backend.calls)
            if self.backend.interrupt_at == count:
                raise KeyboardInterrupt
            if self.run.method in self.backend.fail_methods and count >= self.backend.fail_at:
                raise RuntimeError("fake failure")
            first = self.model.w.detach().clone()
            with torch.no_grad():
                self.model.w += 1.0
            self.known.update(r["prompt"] for r in group)
            handle = combine_restore(handle, {"w": first}, set(), "FAKE")
        return self.model, handle, 0.01 * len(requests)

    def restore(self, edited, handle):
        with torch.no_grad():
            self.model.w.copy_(handle["w"] + (1.0 if self.backend.broken_restore else 0.0))
        self.known.clear()

    def finalize(self, metric, request):
        pre = metric["pre"]["locality"]["neighborhood_output"]
        post = metric["post"]["locality"]["neighborhood_output"]
        metric["post"]["locality"]["neighborhood_acc"] = [float(a == b) for a, b in zip(pre, post)]

    def batch_edit(self, kwargs):
        """EasyEdit's batch_edit(sequential_edit=False) for one chunk: pre, edit, post, restore, finalize."""
        requests = self.prepare(kwargs)
        metrics = [{"case_id": i, "requested_rewrite": r, "pre": self.evaluate(self.model, r)}
                   for i, r in enumerate(requests)]
        edited, handle, seconds = self.apply(requests, None)
        for metric, request in zip(metrics, requests):
            metric.update(time=seconds, post=self.evaluate(edited, request))
        self.restore(edited, handle)
        for metric, request in zip(metrics, requests):
            self.finalize(metric, request)
        return metrics

    def close(self):
        self.backend.closed.append(self.run.method)


class FakeBackend:
    def __init__(self, batchable=None, fail_methods=(), fail_at=1, interrupt_at=None, broken_restore=False,
                 damage_after=3, records=None, strict=False, checkpointable=False, **_):
        self.batchable = batchable or {"GRACE": False, "WISE": False}
        self.fail_methods, self.fail_at, self.interrupt_at = set(fail_methods), fail_at, interrupt_at
        self.broken_restore, self.damage_after = broken_restore, damage_after
        self.calls, self.closed, self.opened, self.loaded = [], [], [], []
        self.records, self.strict, self.checkpointable = records, strict, checkpointable

    def open_method(self, run):
        self.opened.append(run.key)
        return FakeSession(self, run)


class DigestBackend(FakeBackend):
    """A backend whose settings digest the test sets, as EasyEditBackend reads it from the method's YAML."""
    digest = "aaaa"

    def settings_digest(self, run):
        return self.digest


@pytest.fixture(autouse=True)
def data_folder(tmp_path, monkeypatch):
    """A $MEMOE_DATA folder with (empty) files under the datasets' names: the fakes never read them."""
    from memoe_plugin.eval.data import DATA_FILES
    folder = tmp_path / "data"
    folder.mkdir()
    for spec in DATA_FILES.values():
        (folder / spec.names[0]).write_text("[]")
    monkeypatch.setenv("MEMOE_DATA", str(folder))
    return folder


def run_main(tmp_path, backend, *args):
    argv = ["--out", str(tmp_path / "out"), "--no-progress", *args]

    def factory(**kwargs):
        backend.strict = kwargs.get("strict", False)
        return backend
    return compare.main(argv, backend_factory=factory)


def rows_by_method(tmp_path):
    return {r["method"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}


def results(tmp_path):
    return ResultStore(tmp_path / "out" / "results.jsonl").records()


def easyedit(test):
    return pytest.mark.easyedit(pytest.mark.skipif(not EASYEDIT_PATH,
                                                   reason="EASYEDIT_PATH is not set: no EasyEdit checkout")(test))


TINY_HPARAMS = {
    "MEMoE": dict(alg_name="MEMoE", layer=2, module_template="model.layers.{}.mlp.down_proj", lr=5e-2, steps=30,
                  anchor_backend="offline", early_stop=False),
    "FT-L": dict(alg_name="FT", layers=[2], num_steps=5, lr=5e-3, weight_decay=0, kl_factor=0, norm_constraint=False,
                 objective_optimization="prompt_last", rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight",
                 layer_module_tmp="model.layers.{}", mlp_module_tmp="model.layers.{}.mlp",
                 attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm", lm_head_module="lm_head"),
    "LoRA": dict(alg_name="LoRA", lora_type="lora", layers=[], num_steps=3, lr=5e-3, weight_decay=0, kl_factor=0,
                 rank=4, lora_alpha=8, lora_dropout=0.0, norm_constraint=False, target_modules=["q_proj", "v_proj"]),
    "GRACE": dict(alg_name="GRACE", inner_params=["model.layers[2].mlp.down_proj.weight"], edit_lr=1.0, n_iter=5,
                  eps=1.0, dist_fn="euc", val_init="cold", val_train="sgd", val_reg=None, reg="early_stop",
                  replacement="replace_last", eps_expand="coverage", num_pert=8, dropout=0.0),
    "MEMIT": dict(alg_name="MEMIT", layers=[1, 2], clamp_norm_factor=4, layer_selection="all",
                  fact_token="subject_last", v_num_grad_steps=3, v_lr=5e-1, v_loss_layer=3, v_weight_decay=1e-3,
                  kl_factor=0.0625, mom2_adjustment=True, mom2_update_weight=100,
                  rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia",
                  mom2_n_samples=8, mom2_dtype="float32"),
    "UltraEdit": dict(alg_name="ULTRAEDIT", model_class="AutoModelForCausalLM", tokenizer_class="AutoTokenizer",
                      tokenizer_name="unused",
                      inner_params=["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"], dropout=0.0,
                      no_grad_layers=None, lr=1e-6, token="mask", batch_size=2, batch_size_once=1,
                      editor_batch_size=16, silent=True, half=False, results_dir="results"),
    "AlphaEdit": dict(alg_name="AlphaEdit", layers=[1, 2], clamp_norm_factor=0.75, layer_selection="all",
                      fact_token="subject_last", v_num_grad_steps=3, v_lr=1e-1, v_loss_layer=3, v_weight_decay=0.5,
                      kl_factor=0.0625, mom2_adjustment=True, mom2_update_weight=15000,
                      rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                      mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                      ln_f_module="model.norm", lm_head_module="lm_head", mom2_dataset="wikipedia",
                      mom2_n_samples=8, mom2_dtype="float32", nullspace_threshold=2e-2, L2=1),
    "EMMET": dict(alg_name="EMMET", layers=[2], clamp_norm_factor=4, layer_selection="all", fact_token="subject_last",
                  v_num_grad_steps=3, v_lr=5e-1, v_loss_layer=3, v_weight_decay=1e-3, kl_factor=0.0625,
                  mom2_adjustment=True, mom2_update_weight=100000, rewrite_module_tmp="model.layers.{}.mlp.down_proj",
                  layer_module_tmp="model.layers.{}", mlp_module_tmp="model.layers.{}.mlp",
                  attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm", lm_head_module="lm_head",
                  mom2_dataset="wikipedia", mom2_n_samples=8, mom2_dtype="float32", update_norm_lambda=0,
                  emmet_lambda=0.1),
    "R-ROME": dict(alg_name="R-ROME", layers=[1], fact_token="subject_last", v_num_grad_steps=3, v_lr=5e-1,
                   v_loss_layer=3, v_weight_decay=1e-3, clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=False,
                   context_template_length_params=[[5, 5]], rewrite_module_tmp="model.layers.{}.mlp.down_proj",
                   layer_module_tmp="model.layers.{}", mlp_module_tmp="model.layers.{}.mlp",
                   attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm", lm_head_module="lm_head",
                   mom2_dataset="wikipedia", mom2_n_samples=8, mom2_dtype="float32", fp16=False),
    "PMET": dict(alg_name="PMET", layers=[1, 2], clamp_norm_factor=1, layer_selection="all", fact_token="subject_last",
                 v_num_grad_steps=3, v_lr=5e-1, v_loss_layer=3, v_weight_decay=0.5, kl_factor=0.0625,
                 mom2_adjustment=True, mom2_update_weight=15000, nll_loss_factor=1,
                 rewrite_module_tmp="model.layers.{}.mlp.down_proj",
                 rewrite_module_tmps=["model.layers.{}.mlp.down_proj"], layer_module_tmp="model.layers.{}",
                 mlp_module_tmp="model.layers.{}.mlp.down_proj",
                 attn_module_tmp="model.layers.{}.self_attn.o_proj", ln_f_module="model.norm",
                 lm_head_module="lm_head", mom2_dataset="wikipedia", mom2_n_samples=8, mom2_dtype="float32"),
    "DEFER": dict(alg_name="DEFER", inner_params=["model.layers[2].mlp.down_proj.weight"], edit_lr=7e-5, n_iter=5,
                  threshold=0.5),
}


@pytest.fixture
def tiny_setup(tmp_path, tokenizer):
    from conftest import CORPUS, tiny_llama
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    hdir = tmp_path / "hparams"
    hdir.mkdir()
    for name, values in TINY_HPARAMS.items():
        values = dict(values, model_name=str(model_dir), device="cpu", max_length=40, model_parallel=False)
        if name == "MEMIT":
            values["stats_dir"] = str(tmp_path / "stats")
        (hdir / f"{name}.yaml").write_text(yaml.safe_dump(values))
    subjects = [("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "Welsh"),
                ("Japan", "The capital of Japan is", "Warsaw"),
                ("Toko Yasuda", "Toko Yasuda plays the", "violin"),
                ("Eiffel Tower", "The Eiffel Tower is located in", "Tokyo"),
                ("Marie Curie", "Marie Curie was born in", "Paris")]
    records = [{"case_id": i, "prompt": p, "target_new": t, "subject": s, "ground_truth": "French",
                "rephrase_prompt": p.replace("The ", "the "), "locality_prompt": "Who is the father of Marie Curie?",
                "locality_ground_truth": "Wladyslaw"} for i, (s, p, t) in enumerate(subjects)]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS * 2))
    return tmp_path, hdir, data, text
