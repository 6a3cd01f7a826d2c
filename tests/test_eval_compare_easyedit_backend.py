"""memoe-compare, easyedit_backend.py: the methods through EasyEdit with a tiny Llama (with EASYEDIT_PATH),
and the session's scorer, padding and DEFER fixes without EasyEdit."""
from __future__ import annotations

import json
import time

import pytest
import torch
import yaml

from compare_fakes import data_folder, tiny_setup  # noqa: F401 (fixtures, autouse: data_folder)
from memoe_plugin.eval import compare
from memoe_plugin.eval.compare import METHODS, ResultStore, RunSpec, build_config
from memoe_plugin.eval.state import state_fingerprint
from compare_fakes import EASYEDIT_PATH, easyedit, results, rows_by_method


@easyedit
def test_easyedit_batch_protocol_on_a_tiny_llama(tiny_setup):
    tmp_path, hdir, data, text = tiny_setup
    start = time.perf_counter()
    argv = ["--easyedit", EASYEDIT_PATH, "--data", "counterfact", "--data-file", str(data), "--methods",
            "MEMoE,FT-L,LoRA,GRACE,MEMIT", "--hparams-dir", str(hdir), "--num-edits", "4", "--batch-size", "2",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert compare.main(argv) == 0
    rows = rows_by_method(tmp_path)
    assert rows["MEMIT"]["status"] == "unavailable offline" and "--stats-text" in rows["MEMIT"]["error"]
    for method in ("MEMoE", "FT-L", "LoRA", "GRACE"):
        assert rows[method]["status"] == "complete", rows[method]["error"]
        assert rows[method]["cases"] == 4 and rows[method]["rollback"] == "exact"
    assert rows["MEMoE"]["reliability"] > 50
    assert rows["GRACE"]["batchable"] is False and rows["FT-L"]["batchable"] is True
    effective = yaml.safe_load((tmp_path / "out" / "hparams" / "FT-L.yaml").read_text())
    assert effective["num_steps"] == 5
    # MEMIT with stats computed from local text by EasyEdit's own layer_stats
    assert compare.main(argv + ["--resume", "--stats-text", str(text), "--methods", "MEMIT"]) == 0
    rows = rows_by_method(tmp_path)
    assert rows["MEMIT"]["status"] == "complete" and rows["MEMIT"]["rollback"] == "exact"
    stats = list((tmp_path / "stats").rglob("*.npz"))
    assert sorted(p.name for p in stats) == [f"model.layers.{i}.mlp.down_proj_float32_mom2_8.npz" for i in (1, 2)]
    assert all("tiny-llama/wikipedia_stats" in str(p) for p in stats)
    assert time.perf_counter() - start < 300


NEWER_BASELINES = ("UltraEdit", "AlphaEdit", "EMMET", "R-ROME", "PMET", "DEFER")


@easyedit
def test_easyedit_newer_baselines_on_a_tiny_llama(tiny_setup, monkeypatch, capsys):
    """EasyEdit's newer baselines (those registered as runnable) through the batch protocol: 2 chunks of 2,
    covariance statistics from local text, a bit-exact rollback after each chunk; the others reported
    unavailable with their reason; the shipped SmolLM2 files load into EasyEdit's hparams classes."""
    import re
    tmp_path, hdir, data, text = tiny_setup
    monkeypatch.chdir(tmp_path)       # AlphaEdit saves its projection P as ./null_space_project.pt
    runnable = [m for m in NEWER_BASELINES if not METHODS[m].unavailable]
    unavailable = [m for m in NEWER_BASELINES + ("MELO", "SimIE") if METHODS[m].unavailable]
    assert {"AlphaEdit", "R-ROME", "DEFER"} <= set(runnable) and {"MELO", "SimIE"} <= set(unavailable)
    p_loc = tmp_path / "stats" / "tiny-llama" / "AlphaEdit_null_space_project.pt"
    for name in runnable:
        values = yaml.safe_load((hdir / f"{name}.yaml").read_text())
        if "mom2_dataset" in values:
            values["stats_dir"] = str(tmp_path / "stats")
        if name == "AlphaEdit":
            values["P_loc"] = str(p_loc)
        (hdir / f"{name}.yaml").write_text(yaml.safe_dump(values))
    start = time.perf_counter()
    argv = ["--easyedit", EASYEDIT_PATH, "--data", "counterfact", "--data-file", str(data), "--methods",
            ",".join(runnable + unavailable), "--hparams-dir", str(hdir), "--num-edits", "4", "--batch-size", "2",
            "--stats-text", str(text), "--out", str(tmp_path / "out"), "--no-progress"]
    assert compare.main(argv) == 0
    rows = rows_by_method(tmp_path)
    for method in runnable:
        assert rows[method]["status"] == "complete", (method, rows[method]["error"])
        assert rows[method]["cases"] == 4 and rows[method]["rollback"] == "exact", method
        assert rows[method]["batchable"] is (method in ("UltraEdit", "AlphaEdit", "EMMET", "PMET")), method
    for method in unavailable:
        assert rows[method]["status"] == "unavailable offline" and METHODS[method].unavailable in rows[method]["error"]
    if "AlphaEdit" in runnable:      # P from this model's statistics, written where EasyEdit writes it, not at P_loc
        assert (tmp_path / "null_space_project.pt").is_file() and not p_loc.exists()
    stats = sorted(p.name for p in (tmp_path / "stats").rglob("*.npz"))
    assert stats == [f"model.layers.{i}.mlp.down_proj_float32_mom2_8.npz" for i in (1, 2)]
    assert time.perf_counter() - start < 180
    # the shipped SmolLM2 files, also of the methods not runnable yet
    import easyeditor
    for name in NEWER_BASELINES:
        config = build_config(name, compare.hparams_path_for(name, None, {}), {}, None)
        assert config["device"] == "cpu" and config["model_name"].endswith("smollm2-135m-llama")
        if "stats_dir" in config:
            assert config["stats_dir"].endswith("memoe_plugin/stats") and not config["stats_dir"].startswith("~")
        if name == "AlphaEdit":
            assert config["P_loc"].startswith(config["stats_dir"] + "/")
        layers = list(config.get("layers", [])) + [config[k] for k in ("v_loss_layer",) if k in config]
        layers += [int(n) for p in config.get("inner_params", []) for n in re.findall(r"layers[.\[](\d+)", p)]
        assert layers and all(0 <= layer < 30 for layer in layers), (name, layers)
        path = tmp_path / "shipped" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        getattr(easyeditor, METHODS[name].hparams_class).from_hparams(str(path))
    capsys.readouterr()
    assert compare.main(["--list-methods"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in NEWER_BASELINES + ("MELO", "SimIE"):
        assert ("unavailable: " in listed[name]) is bool(METHODS[name].unavailable), listed[name]


@easyedit
def test_easyedit_sequential_protocol_on_a_tiny_llama(tiny_setup):
    tmp_path, hdir, data, text = tiny_setup
    argv = ["--easyedit", EASYEDIT_PATH, "--data", "counterfact", "--data-file", str(data), "--methods",
            "MEMoE,LoRA,GRACE", "--hparams-dir", str(hdir), "--num-edits", "4", "--batch-size", "2",
            "--protocol", "sequential", "--eval-every-step", "--out", str(tmp_path / "out"), "--no-progress"]
    assert compare.main(argv) == 0
    rows = rows_by_method(tmp_path)
    for method in ("MEMoE", "LoRA", "GRACE"):
        row = rows[method]
        assert row["status"] == "complete" and row["cases"] == 4, row["error"]
        assert row["rollback"] == "exact" and list(row["steps"]) == ["0"]
    chunks = [r for r in results(tmp_path) if r["type"] == "chunk" and r["run"].endswith("MEMoE")]
    assert [c["range"] for c in chunks] == [[0, 2], [2, 4]]


@easyedit
def test_easyedit_records_and_rollback_checksums(tiny_setup):
    """Runner on a real EasyEdit session: parameter checksums before/after a non-batchable chunk."""
    tmp_path, hdir, data, text = tiny_setup
    backend = compare.EasyEditBackend(EASYEDIT_PATH, {"counterfact": data}, {"GRACE": hdir / "GRACE.yaml"}, {},
                                      None, tmp_path / "out")
    prepared = backend.records("counterfact", 3)
    records, loc = prepared.edits, prepared.loc_prompts
    assert [r["case_id"] for r in records] == [0, 1, 2] and loc[0] == "Who is the father of Marie Curie? Wladyslaw"
    run = RunSpec("counterfact", "GRACE", "batch", 2, 3)
    session = backend.open_method(run)
    before = state_fingerprint(session.model)
    requests = session.prepare(compare.request_kwargs(records[:2], loc[:2]))
    edited, handle, _ = session.apply(requests, None)
    assert state_fingerprint(session.model) != before          # GRACE's adapter is in the model
    session.restore(edited, handle)
    assert state_fingerprint(session.model) == before


@easyedit
def test_easyedit_memoe_sequential_run_resumes_from_a_checkpoint_exactly(tiny_setup, monkeypatch):
    """Real MEMoE through EasyEdit on a tiny Llama: crash after chunk 2 of 4, --resume, same scores."""
    tmp_path, hdir, data, text = tiny_setup
    hparams = yaml.safe_load((hdir / "MEMoE.yaml").read_text())
    (hdir / "MEMoE.yaml").write_text(yaml.safe_dump(dict(hparams, memory_rows=64, replay=1, steps=10)))
    argv = ["--easyedit", EASYEDIT_PATH, "--data", "counterfact", "--data-file", str(data), "--methods", "MEMoE",
            "--hparams-dir", str(hdir), "--num-edits", "4", "--batch-size", "1", "--protocol", "sequential",
            "--checkpoint-every", "1", "--no-progress"]
    assert compare.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    original = compare.EasyEditSession.apply
    calls = []

    def crash_in_chunk_2(self, requests, handle):
        calls.append(len(requests))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, requests, handle)
    monkeypatch.setattr(compare.EasyEditSession, "apply", crash_in_chunk_2)
    assert compare.main(argv + ["--out", str(tmp_path / "crashed")]) == 130
    monkeypatch.setattr(compare.EasyEditSession, "apply", original)
    assert compare.main(argv + ["--out", str(tmp_path / "crashed"), "--resume"]) == 0

    def final(folder):
        return [(r["index"], r["metric"]["post"]) for r in ResultStore(tmp_path / folder / "results.jsonl").records()
                if r["type"] == "case" and r["final"]]
    assert len(final("whole")) == 4 and final("crashed") == final("whole")
    # the adapter after chunk 2 (trained after the resume) is the same, tensor for tensor
    from safetensors.torch import load_file
    folder = lambda run: next((tmp_path / run / "checkpoints").iterdir())      # noqa: E731
    a, b = (load_file(folder(run) / "chunk-00002.safetensors") for run in ("whole", "crashed"))
    assert sorted(a) == sorted(b) and "memory.x" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = [r for r in ResultStore(tmp_path / "crashed" / "results.jsonl").records() if r["type"] == "resumed"]
    assert [r["after_chunk"] for r in resumed] == [1]
    row = json.loads((tmp_path / "crashed" / "summary.json").read_text())[0]
    assert row["status"] == "complete" and row["rollback"] == "exact"


@easyedit
@pytest.mark.parametrize("method", ["MEMoE", "DEFER"])
def test_easyedit_knowedit_records_score_same_subject_locality(tiny_setup, method):
    """KnowEdit files through EasyEdit's KnowEditDataset: rephrase from the raw file, same-subject
    locality scored by EasyEdit as Relation_Specificity, unrelated locality from records not edited.
    DEFER: EasyEdit scores the two same-subject prompts as one batch, which its layer cannot take
    without :func:`defer_one_row_at_a_time`."""
    tmp_path, hdir, data, text = tiny_setup
    flat = json.loads(data.read_text())
    knowedit = [{"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"],
                 "ground_truth": [r["ground_truth"]], "rephrase_prompt": r["rephrase_prompt"],
                 "locality": {"Relation_Specificity": [{"prompt": f"{r['subject']} was made by",
                                                        "ground_truth": ["nobody"]},
                                                       {"prompt": f"The colour of {r['subject']} is",
                                                        "ground_truth": ["red"]}]},
                 "portability": {"Reasoning": [{"prompt": f"The language of {r['target_new']} is",
                                                "ground_truth": "Polish"}]}} for r in flat]
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps(knowedit))
    argv = ["--easyedit", EASYEDIT_PATH, "--data", "zsre-knowedit", "--data-file", str(path), "--methods", method,
            "--hparams-dir", str(hdir), "--num-edits", "3", "--batch-size", "3", "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert compare.main(argv) == 0
    row = rows_by_method(tmp_path)[method]
    assert row["status"] == "complete" and row["rollback"] == "exact", row["error"]
    cases = [r for r in results(tmp_path) if r["type"] == "case"]
    assert len(cases) == 3
    for case in cases:
        request = case["metric"]["requested_rewrite"]
        assert request["rephrase_prompt"] == request["prompt"].replace("The ", "the ")
        same = request["locality"]["Relation_Specificity"]
        assert len(same["prompt"]) == 2 and request["subject"] in same["prompt"][0]
        unrelated = request["locality"]["neighborhood"]["prompt"]
        assert not any(knowedit[i]["subject"] in unrelated for i in range(3))    # about a record not edited
        assert len(case["metric"]["post"]["locality"]["Relation_Specificity_acc"]) == 2
        assert request["portability"]["Reasoning"]["prompt"] == [f"The language of {request['target_new']} is"]
        assert len(case["metric"]["post"]["portability"]["Reasoning_acc"]) == 1
    assert row["same_subject"] is not None and row["locality"] is not None and row["portability"] is not None
    assert "Same-subj." in (tmp_path / "out" / "summary.md").read_text() and "Port." in (
        tmp_path / "out" / "summary.md").read_text()


def _session_with_scorer(scorer):
    from types import SimpleNamespace
    from memoe_plugin.eval.compare.easyedit_backend import EasyEditSession
    session = object.__new__(EasyEditSession)      # no EasyEdit: only evaluate() is exercised
    session.editor = SimpleNamespace(hparams=SimpleNamespace(device="cpu"), model_name="m", tok=None)
    session._compute = scorer
    return session


def _grace_like_scorer(model, model_name, hparams, tok, request, device):
    """Fails as EasyEdit's ``test_prediction_acc(vanilla_generation=True)`` does on a long portability answer."""
    if request.get("portability"):
        raise ValueError("operands could not be broadcast together with shapes (17,) (13,) ")
    return {"rewrite_acc": [1.0], "locality": {}, "portability": {}}


def test_an_unscorable_portability_prompt_is_left_unscored_not_the_run_stopped():
    session = _session_with_scorer(_grace_like_scorer)
    request = {"prompt": "p", "target_new": "t", "portability": {"Reasoning": {"prompt": ["q"], "ground_truth": ["a"]}}}
    metric = session.evaluate(None, request)
    assert metric["rewrite_acc"] == [1.0]
    assert "broadcast" in metric["portability_unscored"]
    assert "portability" in request                       # the caller's request is not changed
    assert "portability_unscored" not in session.evaluate(None, {"prompt": "p", "target_new": "t"})


def test_other_scorer_errors_still_stop_the_run():
    def broken(model, model_name, hparams, tok, request, device):
        raise ValueError("something else")

    def broadcast_without_portability(model, model_name, hparams, tok, request, device):
        raise ValueError("operands could not be broadcast together")

    with pytest.raises(ValueError, match="something else"):
        _session_with_scorer(broken).evaluate(None, {"prompt": "p", "portability": {"R": {}}})
    with pytest.raises(ValueError, match="broadcast"):      # nothing to leave out: a real failure
        _session_with_scorer(broadcast_without_portability).evaluate(None, {"prompt": "p"})


def test_ft_l_and_pmet_get_the_right_padding_their_last_token_index_assumes():
    """EasyEdit's FT-L (prompt_last) and PMET find a prompt's last token as attention_mask.sum(1) - 1, which
    BaseEditor's left padding breaks for every prompt shorter than the chunk's longest; FT-M's target_new
    mask counts the pads itself and stays on the left."""
    from memoe_plugin.eval.compare.easyedit_backend import needs_right_padding
    padded = {name for name, spec in METHODS.items() if needs_right_padding(spec)}
    assert padded == {"FT-L", "PMET"}
    assert dict(METHODS["FT-L"].fixed)["objective_optimization"] == "prompt_last"      # what makes FT-L need it
    assert dict(METHODS["FT-M"].fixed)["objective_optimization"] == "target_new"


class DeferAdaptor(torch.nn.Module):
    """Shaped like EasyEdit's DEFER layer at evaluation: a (B, 1) gate and (B, D) values from the last
    position, picked against the (B, T, D) base output, which broadcasts only for B = 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.original_layer, self.defer, self.predict_values = (torch.nn.Linear(4, 4), torch.nn.Linear(4, 1),
                                                                 torch.nn.Linear(4, 4))

    def forward(self, *args):
        layer_out, query = self.original_layer(*args), args[0][:, -1, :]
        return torch.where(torch.sigmoid(self.defer(query)) >= 0.5, self.predict_values(query), layer_out)


def test_defer_layers_run_each_sequence_of_a_batch_on_its_own():
    """EasyEdit scores KnowEdit's list prompts as one batch, which stops DEFER's layer; row by row, each
    sequence gets the output it gets alone, and a batch of one is left as it was."""
    from memoe_plugin.eval.compare.easyedit_backend import defer_one_row_at_a_time
    model = torch.nn.Sequential(torch.nn.Identity(), DeferAdaptor())
    batch = torch.randn(3, 5, 4)
    with pytest.raises(RuntimeError):
        model(batch)
    before = state_fingerprint(model)
    assert defer_one_row_at_a_time(model) == 1 and defer_one_row_at_a_time(model) == 0    # once per layer
    out = model(batch)
    assert out.shape == (3, 5, 4) and state_fingerprint(model) == before
    for i in range(3):
        assert torch.equal(out[i:i + 1], model(batch[i:i + 1]))
    gates = torch.sigmoid(model[1].defer(batch[:, -1, :])).squeeze(1) >= 0.5
    assert gates.any() and not gates.all(), "the check needs rows on both sides of the threshold"
    for i in range(3):
        expected = model[1].predict_values(batch[i, -1]).expand(5, 4) if gates[i] else model[1].original_layer(batch[i])
        assert torch.allclose(out[i], expected)


@easyedit
def test_easyedit_settings_digest_follows_the_yaml_and_set(tiny_setup):
    tmp_path, hdir, data, text = tiny_setup
    run = RunSpec("counterfact", "GRACE", "batch", 2, 3)

    def digest(overrides=None):
        backend = compare.EasyEditBackend(EASYEDIT_PATH, {"counterfact": data}, {"GRACE": hdir / "GRACE.yaml"},
                                          overrides or {}, None, tmp_path / "out")
        return backend.settings_digest(run)
    shipped = digest()
    assert digest() == shipped                                   # the same file reads the same
    assert digest({"GRACE": {"eps": 123.0}}) != shipped           # a --set changes it
    config = yaml.safe_load((hdir / "GRACE.yaml").read_text())
    (hdir / "GRACE.yaml").write_text("# a comment changes nothing\n" + yaml.safe_dump(config))
    assert digest() == shipped
    (hdir / "GRACE.yaml").write_text(yaml.safe_dump(dict(config, n_iter=config["n_iter"] + 1)))
    assert digest() != shipped
