"""memoe-compare: protocol logic on fakes (always), and on EasyEdit with a tiny Llama (with EASYEDIT_PATH).

The fake backend stands in for EasyEdit: its "model" is one parameter vector that
each edit changes, its scores say whether a prompt was edited, and its restore can
be told to fail. That is enough to check chunking, rollback checks, resume after
an interruption and a failing method without EasyEdit or a real model.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
import yaml

from memoe_plugin.eval import compare
from memoe_plugin.assets import compare_hparams_dir
from memoe_plugin.eval.compare import (METHODS, CompareError, ResultStore, RunSpec, Runner, build_config,
                                       chunk_ranges, combine_restore, parse_overrides, prepare_records,
                                       summarise)
from memoe_plugin.eval.state import state_fingerprint

EASYEDIT_PATH = os.environ.get("EASYEDIT_PATH")


# ----------------------------------------------------------------------------- fakes
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


# ----------------------------------------------------------------------------- pure helpers
def test_chunk_ranges():
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges(30, 30) == [(0, 30)]
    assert chunk_ranges(2, 10) == [(0, 2)]
    with pytest.raises(CompareError):
        chunk_ranges(3, 0)


def test_prepare_records_takes_wise_loc_prompts_from_records_after_the_edits():
    prepared = prepare_records(fake_records(5), 3)
    edits, loc = prepared.edits, prepared.loc_prompts
    assert [r["case_id"] for r in edits] == [100, 101, 102]
    assert loc == ["Other3 lives in Town3", "Other4 lives in Town4", "Other3 lives in Town3"]
    with pytest.raises(CompareError, match="usable records"):
        prepare_records(fake_records(2), 3)


def test_combine_restore_keeps_the_first_callable_and_the_first_copy_of_each_tensor():
    first, later = (lambda: "first"), (lambda: "later")
    assert combine_restore(None, first, {"GRACE"}, "GRACE") is first
    assert combine_restore(first, later, {"GRACE"}, "GRACE") is first
    a, b = torch.zeros(1), torch.ones(1)
    merged = combine_restore({"x": a}, {"x": b, "y": b}, set(), "FT")
    assert merged["x"] is a and merged["y"] is b


def test_state_fingerprint_sees_one_ulp_and_new_modules():
    model = FakeModel()
    before = state_fingerprint(model)
    with torch.no_grad():
        model.w[3] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert state_fingerprint(model) != before
    with torch.no_grad():
        model.w.zero_()
    assert state_fingerprint(model) == before
    model.extra = torch.nn.Linear(1, 1)
    assert state_fingerprint(model) != before


def test_overrides_steps_alias_fixed_objective_and_paths(tmp_path):
    overrides = parse_overrides(["FT-L.steps=20", "wise.n_iter=5", "FT-L.lr=1e-3"], ["FT-L", "WISE"])
    assert overrides == {"FT-L": {"steps": 20, "lr": 1e-3}, "WISE": {"n_iter": 5}}
    with pytest.raises(CompareError, match="METHOD.key=value"):
        parse_overrides(["steps=3"], ["FT-L"])
    with pytest.raises(CompareError, match="not in --methods"):
        parse_overrides(["GRACE.n_iter=3"], ["FT-L"])
    path = compare_hparams_dir() / "FT-L.yaml"
    config = build_config("FT-L", path, {"steps": 20}, None)
    assert config["num_steps"] == 20 and config["objective_optimization"] == "prompt_last"
    assert not config["model_name"].startswith("~")
    assert build_config("FT-L", path, {}, str(tmp_path / "m-llama"))["model_name"] == str(tmp_path / "m-llama")
    with pytest.raises(CompareError, match="no key 'bogus'"):
        build_config("FT-L", path, {"bogus": 1}, None)
    with pytest.raises(CompareError, match="prompt_last"):
        build_config("FT-L", path, {"objective_optimization": "target_new"}, None)
    with pytest.raises(CompareError, match="alg_name"):
        build_config("FT-L", compare_hparams_dir() / "GRACE.yaml", {}, None)


@pytest.mark.parametrize("protocol", ["batch", "sequential"])
@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if not s.unavailable])
def test_shipped_hparams_fit_smollm2(method, protocol):
    path = compare.hparams_path_for(method, None, {}, protocol)
    config = yaml.safe_load(path.read_text())
    assert config["alg_name"] == METHODS[method].alg_name
    assert str(config["device"]) == "cpu" and "smollm2-135m-llama" in config["model_name"]
    for key, value in METHODS[method].fixed:
        assert config[key] == value
    layers = list(config.get("layers", [])) + [config[k] for k in ("layer", "v_loss_layer") if k in config]
    layers += [int(n) for p in config.get("inner_params", []) for n in re.findall(r"layers[.\[](\d+)", p)]
    assert all(0 <= layer < 30 for layer in layers), layers


# ----------------------------------------------------------------------------- protocols on fakes
@pytest.mark.parametrize("method, per_request", [("FT-L", False), ("GRACE", True)])
def test_batch_protocol_chunks_and_rolls_back_between_chunks(tmp_path, method, per_request):
    backend = FakeBackend()
    assert run_main(tmp_path, backend, "--methods", method, "--num-edits", "7", "--batch-size", "3") == 0
    sizes = [len(prompts) for _, prompts in backend.calls]
    assert sizes == ([1] * 7 if per_request else [3, 3, 1])
    chunks = [r for r in results(tmp_path) if r["type"] == "chunk"]
    assert [c["range"] for c in chunks] == [[0, 3], [3, 6], [6, 7]]
    assert all(c["rollback_exact"] for c in chunks)
    row = rows_by_method(tmp_path)[method]
    assert row["status"] == "complete" and row["cases"] == 7 and row["rollback"] == "exact"
    # every edit was learnt, and rollback between chunks kept the locality damage (after 3 edits) away
    assert row["reliability"] == 100.0 and row["locality"] == 100.0
    assert ("one after another" in row["note"]) == per_request
    cases = [r for r in results(tmp_path) if r["type"] == "case"]
    assert [c["index"] for c in cases] == list(range(7)) and cases[0]["record_id"] == 100
    out = tmp_path / "out"
    for name in ("summary.md", "summary.csv", "summary.json", "summary.png", "commands.txt"):
        assert (out / name).exists(), name
    assert f"| {method} | 100.0 | 100.0 | 100.0 | 100.0 |" in (out / "summary.md").read_text()
    assert "hparams tuned by memoe-tune (2 trials" in (out / "summary.md").read_text()   # how it was tuned


def test_a_rollback_that_does_not_restore_stops_the_method(tmp_path):
    backend = FakeBackend(broken_restore=True)
    assert run_main(tmp_path, backend, "--methods", "FT-L", "--num-edits", "6", "--batch-size", "3") == 0
    chunks = [r for r in results(tmp_path) if r["type"] == "chunk"]
    assert [c["rollback_exact"] for c in chunks] == [False]        # chunk 1 never ran
    row = rows_by_method(tmp_path)["FT-L"]
    assert row["status"] == "error" and "RollbackError" in row["error"] and row["rollback"] == "DIFFERS"
    assert "rollback did NOT restore" in (tmp_path / "out" / "summary.md").read_text()


def test_a_failing_method_is_reported_and_the_others_still_run(tmp_path):
    backend = FakeBackend(fail_methods={"FT-M"}, fail_at=1)
    assert run_main(tmp_path, backend, "--methods", "MEMoE,FT-M,MEND,GRACE", "--num-edits", "4",
                    "--batch-size", "2") == 0
    rows = rows_by_method(tmp_path)
    assert rows["MEMoE"]["status"] == rows["GRACE"]["status"] == "complete"
    assert rows["FT-M"]["status"] == "error" and rows["FT-M"]["error"] == "RuntimeError: fake failure"
    assert rows["MEND"]["status"] == "unavailable offline" and "hypernetwork" in rows["MEND"]["error"]
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| FT-M | error |" in markdown and "fake failure" in markdown
    errors = [r for r in results(tmp_path) if r["type"] == "error" and r["run"].endswith("FT-M")]
    assert errors[0]["chunk"] == 0 and "Traceback" in errors[0]["traceback"]
    assert "FT-M" in backend.closed


def test_interrupted_run_resumes_after_the_last_finished_chunk(tmp_path):
    backend = FakeBackend(interrupt_at=2)          # Ctrl-C during the second chunk of the first method
    assert run_main(tmp_path, backend, "--methods", "MEMoE,FT-L", "--num-edits", "7", "--batch-size", "3") == 130
    done = [r for r in results(tmp_path) if r["type"] == "chunk"]
    assert [c["chunk"] for c in done] == [0]
    assert rows_by_method(tmp_path)["MEMoE"]["status"] == "partial"
    # without --resume the same command refuses to mix runs
    assert run_main(tmp_path, FakeBackend(), "--methods", "MEMoE,FT-L", "--num-edits", "7",
                    "--batch-size", "3") == 2
    again = FakeBackend()
    assert run_main(tmp_path, again, "--methods", "MEMoE,FT-L", "--num-edits", "7", "--batch-size", "3",
                    "--resume") == 0
    assert [p[0] for _, p in again.calls] == ["Subject3 lives in", "Subject6 lives in",       # MEMoE 1, 2
                                              "Subject0 lives in", "Subject3 lives in", "Subject6 lives in"]
    rows = rows_by_method(tmp_path)
    assert rows["MEMoE"]["status"] == rows["FT-L"]["status"] == "complete"
    assert rows["MEMoE"]["cases"] == 7 and rows["MEMoE"]["reliability"] == 100.0
    # a third --resume has nothing left to do
    third = FakeBackend()
    assert run_main(tmp_path, third, "--methods", "MEMoE,FT-L", "--num-edits", "7", "--batch-size", "3",
                    "--resume") == 0
    assert third.calls == [] and third.opened == []


def test_cases_of_an_unfinished_chunk_and_a_torn_line_are_ignored(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    runner = Runner(FakeBackend(), store, progress=False)
    run = RunSpec("zsre", "FT-L", "batch", 2, 4)
    runner.run_one(run)
    records = store.records()
    last_chunk = max(i for i, r in enumerate(records) if r["type"] == "chunk")
    lines = store.path.read_text().splitlines()
    # keep chunk 0 and the cases of chunk 1, drop chunk 1's record, and tear the last line (a crash mid-write)
    store.path.write_text("\n".join(lines[:last_chunk] + ['{"type": "case", "run": "zsre']) + "\n")
    assert summarise(store.records())[0]["cases"] == 2
    backend = FakeBackend()
    Runner(backend, store, resume=True, progress=False).run_one(run)
    assert [p for _, p in backend.calls] == [["Subject2 lives in", "Subject3 lives in"]]
    row = summarise(store.records())[0]
    assert row["status"] == "complete" and row["cases"] == 4


@pytest.mark.parametrize("method", ["MEMoE", "WISE"])
def test_sequential_protocol_keeps_edits_and_scores_after_the_last(tmp_path, method):
    backend = FakeBackend(damage_after=4)
    assert run_main(tmp_path, backend, "--methods", method, "--protocol", "sequential", "--num-edits", "7",
                    "--batch-size", "3", "--eval-every-step") == 0
    sizes = [len(p) for _, p in backend.calls]
    assert sizes == ([1] * 7 if method == "WISE" else [3, 3, 1])
    row = rows_by_method(tmp_path)[method]
    assert row["status"] == "complete" and row["cases"] == 7
    assert row["reliability"] == 100.0          # nothing was rolled back: every edit is still there at the end
    assert row["locality"] == 0.0               # 7 edits > 4: "damaged" relative to pre on the unedited model
    assert row["rollback"] == "exact"           # the combined restore handle undid all chunks at the end
    assert list(row["steps"]) == ["0", "1"]       # JSON keys
    assert row["steps"]["0"]["locality"] == 100.0 and row["steps"]["1"]["locality"] == 0.0
    assert "Per-step scores" in (tmp_path / "out" / "summary.md").read_text()


def test_sequential_resume_restarts_an_unfinished_method(tmp_path):
    assert run_main(tmp_path, FakeBackend(interrupt_at=2), "--methods", "MEMoE", "--protocol", "sequential",
                    "--num-edits", "4", "--batch-size", "2") == 130
    backend = FakeBackend()
    assert run_main(tmp_path, backend, "--methods", "MEMoE", "--protocol", "sequential", "--num-edits", "4",
                    "--batch-size", "2", "--resume") == 0
    assert len(backend.calls) == 2
    row = rows_by_method(tmp_path)["MEMoE"]
    assert row["status"] == "complete" and row["cases"] == 4


def test_bad_records_are_listed_and_skipped_before_the_first_edit(tmp_path, capsys):
    records = fake_records(12)
    records[2]["target_new"] = "  "                               # as ZsRE record 534
    records[5].update(prompt=records[1]["prompt"], subject="Subject1")  # the same question, another target
    records[7]["subject"] = "Nobody"                                # not in the prompt
    backend = FakeBackend(records=records)
    assert run_main(tmp_path, backend, "--methods", "MEMoE", "--protocol", "sequential", "--num-edits", "8",
                    "--batch-size", "4") == 0
    skipped = [r for r in results(tmp_path) if r["type"] == "skipped"]
    assert [(s["index"], s["record_id"]) for s in skipped] == [(2, 102), (5, 105), (7, 107)]
    assert "'target_new' is missing, empty" in skipped[0]["reason"]
    assert "repeats record 1's with another target ('City1')" in skipped[1]["reason"]
    assert "does not occur in the prompt" in skipped[2]["reason"]
    assert "record 2 (id 102)" in capsys.readouterr().err
    edited = [p for _, prompts in backend.calls for p in prompts]
    assert len(edited) == 8 and records[2]["prompt"] not in edited and records[7]["prompt"] not in edited
    row = rows_by_method(tmp_path)["MEMoE"]
    assert row["status"] == "complete" and row["cases"] == 8 and row["skipped_records"] == 3
    assert "3 records of the split skipped" in (tmp_path / "out" / "summary.md").read_text()
    # --strict stops before anything is edited, naming every bad record
    strict = FakeBackend(records=records)
    assert run_main(tmp_path / "strict", strict, "--methods", "MEMoE", "--num-edits", "8", "--strict") == 2
    err = capsys.readouterr().err
    assert strict.calls == [] and "3 of the 12 all records cannot be used (--strict)" in err
    assert "record 5 (id 105)" in err and "record 7 (id 107)" in err


def test_seeds_draw_their_own_records_and_the_summary_gives_the_spread(tmp_path):
    backend = FakeBackend(damage_after=100)
    assert run_main(tmp_path, backend, "--methods", "MEMoE", "--num-edits", "6", "--batch-size", "3",
                    "--seeds", "0,1,2", "--split", "test") == 0
    calls = [prompts for _, prompts in backend.calls]                # two chunks of 3 per seed
    samples = [tuple(calls[i] + calls[i + 1]) for i in range(0, len(calls), 2)]
    assert len(samples) == 3 and len(set(samples)) == 3            # each seed its own records
    from memoe_plugin.eval.splits import split_of
    assert all(split_of({"prompt": p}) == "test" for s in samples for p in s)
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(r["seed"] for r in rows) == [0, 1, 2] and {r["split"] for r in rows} == {"test"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "test split, seeds 0, 1, 2" in summary and "100.0 ± 0.0" in summary
    assert run_main(tmp_path, FakeBackend(), "--seeds", "1,x") == 2


def test_a_crashed_sequential_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    args = ["--methods", "MEMoE", "--protocol", "sequential", "--num-edits", "10", "--batch-size", "2",
            "--checkpoint-every", "2", "--eval-every-step"]
    whole = FakeBackend(checkpointable=True, damage_after=5)
    assert run_main(tmp_path / "whole", whole, *args) == 0
    crashed = FakeBackend(checkpointable=True, damage_after=5, interrupt_at=4)   # dies in chunk 3
    assert run_main(tmp_path, crashed, *args) == 130
    resumed = FakeBackend(checkpointable=True, damage_after=5)
    assert run_main(tmp_path, resumed, *args, "--resume") == 0
    assert resumed.loaded == ["chunk-00001.safetensors"]             # after chunks 0 and 1
    assert [p for _, p in resumed.calls] == [p for _, p in whole.calls][2:]
    final = lambda folder: [(r["index"], r["metric"]["post"]) for r in ResultStore(   # noqa: E731
        folder / "out" / "results.jsonl").records() if r["type"] == "case" and r["final"]]
    assert final(tmp_path) == final(tmp_path / "whole") and len(final(tmp_path)) == 10
    a, b = rows_by_method(tmp_path)["MEMoE"], rows_by_method(tmp_path / "whole")["MEMoE"]
    for key in ("reliability", "generality", "locality", "cases", "steps"):
        assert a[key] == b[key], key
    assert a["edit_seconds"] == pytest.approx(b["edit_seconds"])     # the chunks before the crash count too
    # a method whose session cannot checkpoint restarts from the beginning
    assert run_main(tmp_path / "plain", FakeBackend(interrupt_at=2), *args) == 130
    again = FakeBackend()
    assert run_main(tmp_path / "plain", again, *args, "--resume") == 0
    assert len(again.calls) == 5 and again.loaded == []


def test_generation_and_probes_are_scored_on_the_edited_model_before_rollback(tmp_path, monkeypatch):
    import memoe_plugin.eval.probes as probes
    monkeypatch.setattr(probes, "load_probes", lambda folder, n, tasks=None: list(range(n)))
    monkeypatch.setenv("MEMOE_PROBES", str(tmp_path))
    backend = FakeBackend(damage_after=2)
    assert run_main(tmp_path, backend, "--methods", "MEMoE,GRACE", "--num-edits", "6", "--batch-size", "3,6",
                    "--generation", "--probes", "10") == 0
    rows = {(r["method"], r["batch_size"]): r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert sorted(rows) == [("GRACE", 3), ("GRACE", 6), ("MEMoE", 3), ("MEMoE", 6)]
    for row in rows.values():
        assert row["status"] == "complete" and row["gen_em"] == 100.0 and row["rollback"] == "exact"
        assert row["pre_gen_em"] == 0.0                     # the unedited model's greedy answers, before the edit
    # Sequentially too: the unedited model's answers come from the model after its rollback.
    assert run_main(tmp_path / "seq", FakeBackend(), "--methods", "MEMoE", "--num-edits", "6", "--protocol",
                    "sequential", "--batch-size", "3", "--generation") == 0
    (seq,) = json.loads((tmp_path / "seq" / "out" / "summary.json").read_text())
    assert seq["gen_em"] == 100.0 and seq["pre_gen_em"] == 0.0
    # 3 edits do not "damage" the fake model (damage_after=2 means > 2 do): half the items flip
    assert rows[("MEMoE", 3)]["probes"]["toy"]["change"] == -50.0
    assert rows[("MEMoE", 3)]["probes"]["toy"]["before"] == 100.0
    probes_seen = [r for r in results(tmp_path) if r["type"] == "probe"]
    assert [(p["stage"], p["chunk"]) for p in probes_seen[:2]] == [("before", None), ("after", 0)]
    assert len(probes_seen) == 8                            # before and after the first chunk, for each run
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## General ability (probes)" in summary and "-50.0 [" in summary and "| zsre EM |" in summary
    assert (tmp_path / "out" / "general_ability.csv").exists() and (tmp_path / "out" / "general_ability.png").exists()
    assert run_main(tmp_path / "bad", FakeBackend(), "--batch-size", "10,x") == 2


def test_wild_answers_are_scored_for_every_method_under_both_protocols(tmp_path):
    for protocol in ("batch", "sequential"):
        out = tmp_path / protocol
        assert run_main(out, FakeBackend(), "--methods", "MEMoE,FT-L", "--num-edits", "6", "--batch-size", "3",
                        "--protocol", protocol, "--wild") == 0
        rows = json.loads((out / "out" / "summary.json").read_text())
        assert {r["method"] for r in rows} == {"MEMoE", "FT-L"}
        for row in rows:
            assert row["wild_em"] == 100.0 and row["wild_em_instructed"] == 0.0 and row["gen_em"] is None
        assert "| zsre WILD |" in (out / "out" / "summary.md").read_text()


def test_usage_errors(tmp_path, capsys):
    assert run_main(tmp_path, FakeBackend(), "--methods", "FT-Q") == 2
    assert "unknown method" in capsys.readouterr().err
    assert run_main(tmp_path, FakeBackend(), "--data", "zsre,counterfact", "--data-file", "x.json") == 2
    assert run_main(tmp_path, FakeBackend(), "--data", "wiki") == 2


def test_summarize_only_and_two_datasets_in_one_table(tmp_path):
    backend = FakeBackend()
    assert run_main(tmp_path, backend, "--data", "zsre,counterfact", "--methods", "MEMoE,GRACE",
                    "--num-edits", "2", "--batch-size", "2") == 0
    (tmp_path / "out" / "summary.md").unlink()
    assert run_main(tmp_path, FakeBackend(), "--summarize-only") == 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "zsre Rel." in markdown and "counterfact Rel." in markdown
    with (tmp_path / "out" / "summary.csv").open() as handle:
        assert len(handle.read().strip().splitlines()) == 1 + 4


# ----------------------------------------------------------------------------- EasyEdit-backed
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


# ------------------------------------------- EasyEdit's generation scorer failing on portability (GRACE)
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


def test_the_summary_counts_the_edits_whose_portability_went_unscored():
    run = "zsre|sequential|bs=10|n=2|GRACE"
    post = {"rewrite_acc": [1.0], "rephrase_acc": [1.0], "locality": {}, "portability": {}}
    records = [{"type": "run_start", "run": run, "attempt": "a"},
               {"type": "chunk", "run": run, "attempt": "a", "chunk": 0, "range": [0, 2], "edit_seconds": 1.0},
               *[{"type": "case", "run": run, "attempt": "a", "chunk": 0, "step": 0, "index": i, "final": True,
                  "metric": {"pre": {}, "post": dict(post, **({"portability_unscored": "why"} if i else {}))}}
                 for i in range(2)],
               {"type": "run_end", "run": run, "attempt": "a", "status": "complete"}]
    rows = summarise(records)
    assert rows[0]["portability_unscored"] == 1
    from memoe_plugin.eval.compare.report import markdown_summary
    assert "portability of 1 edits unscored" in markdown_summary(rows)


def test_ft_l_and_pmet_get_the_right_padding_their_last_token_index_assumes():
    """EasyEdit's FT-L (prompt_last) and PMET find a prompt's last token as attention_mask.sum(1) - 1, which
    BaseEditor's left padding breaks for every prompt shorter than the chunk's longest; FT-M's target_new
    mask counts the pads itself and stays on the left."""
    from memoe_plugin.eval.compare.easyedit_backend import needs_right_padding
    padded = {name for name, spec in METHODS.items() if needs_right_padding(spec)}
    assert padded == {"FT-L", "PMET"}
    assert dict(METHODS["FT-L"].fixed)["objective_optimization"] == "prompt_last"      # what makes FT-L need it
    assert dict(METHODS["FT-M"].fixed)["objective_optimization"] == "target_new"


def test_each_methods_needs_are_data_on_its_spec_and_the_backend_names_no_method():
    """The backend reads MethodSpec fields; a new method is one registry entry, not a switch in the backend."""
    import inspect
    import re
    from memoe_plugin.eval.compare import easyedit_backend, protocol
    for module in (easyedit_backend, protocol):
        source = inspect.getsource(module)
        named = {m for m in re.findall(r'[=!]= ?"([A-Za-z-]+)"', source) if m in METHODS or
                 m in {spec.alg_name for spec in METHODS.values()}}
        assert not named, (module.__name__, named)
    assert METHODS["MEMoE"].checkpointable and METHODS["MEMoE"].own_hparams
    assert METHODS["AlphaEdit"].reset_before_run and METHODS["UltraEdit"].chunk_is_batch
    assert {n for n, s in METHODS.items() if s.statistics} == {"ROME", "MEMIT", "EMMET", "AlphaEdit", "PMET",
                                                                "R-ROME"}


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


class DigestBackend(FakeBackend):
    """A backend whose settings digest the test sets, as EasyEditBackend reads it from the method's YAML."""
    digest = "aaaa"

    def settings_digest(self, run):
        return self.digest


def test_resume_refuses_results_made_with_other_settings(tmp_path):
    first = DigestBackend(interrupt_at=2)
    assert run_main(tmp_path, first, "--methods", "FT-L", "--num-edits", "7", "--batch-size", "3") == 130
    assert [r["settings_digest"] for r in results(tmp_path) if r["type"] == "run_start"] == ["aaaa"]
    changed = DigestBackend()
    changed.digest = "bbbb"               # the YAML was edited (or a tuned file installed) since
    assert run_main(tmp_path, changed, "--methods", "FT-L", "--num-edits", "7", "--batch-size", "3",
                    "--resume") == 2
    assert changed.opened == [] and changed.calls == []          # nothing was run, nothing joined
    same = DigestBackend()
    assert run_main(tmp_path, same, "--methods", "FT-L", "--num-edits", "7", "--batch-size", "3", "--resume") == 0
    assert rows_by_method(tmp_path)["FT-L"]["status"] == "complete"
    # a complete run is not skipped silently under other settings either
    assert run_main(tmp_path, changed, "--methods", "FT-L", "--num-edits", "7", "--batch-size", "3",
                    "--resume") == 2


def test_an_attempt_that_finished_nothing_does_not_pin_the_settings(tmp_path):
    broken = DigestBackend(fail_methods={"FT-L"}, fail_at=0)    # fails in its first chunk: nothing finished
    assert run_main(tmp_path, broken, "--methods", "FT-L", "--num-edits", "4", "--batch-size", "2") == 0
    fixed = DigestBackend()
    fixed.digest = "cccc"                 # the user fixed the file and resumes
    assert run_main(tmp_path, fixed, "--methods", "FT-L", "--num-edits", "4", "--batch-size", "2", "--resume") == 0
    assert rows_by_method(tmp_path)["FT-L"]["status"] == "complete"


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
