"""memoe-compare, protocol.py: the batch and sequential protocols (the Runner) on the fake backend."""
from __future__ import annotations

import json

import pytest

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from compare_fakes import FakeBackend, results, rows_by_method, run_main


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


def test_fluency_is_scored_before_and_after_the_edits_under_both_protocols(tmp_path):
    import math
    assert run_main(tmp_path / "batch", FakeBackend(damage_after=3), "--methods", "MEMoE", "--num-edits", "6",
                    "--batch-size", "3", "--fluency") == 0      # chunks of 3 edits: not "damaged"
    seen = [r for r in results(tmp_path / "batch") if r["type"] == "fluency"]
    assert [(r["stage"], r["chunk"]) for r in seen] == [("before", None), ("after", 0)]   # the first chunk only
    assert not [r for r in results(tmp_path / "batch") if r["type"] == "probe"]          # no probes were asked
    (row,) = json.loads((tmp_path / "batch" / "out" / "summary.json").read_text())
    assert row["fluency"]["continuations_changed"] == 0 and row["fluency"]["perplexity_after"] == math.exp(1.0)
    assert run_main(tmp_path / "seq", FakeBackend(damage_after=3), "--methods", "MEMoE", "--num-edits", "6",
                    "--batch-size", "3", "--protocol", "sequential", "--fluency") == 0
    (row,) = json.loads((tmp_path / "seq" / "out" / "summary.json").read_text())
    f = row["fluency"]     # 6 edits kept > 3: the fake repeats itself and its loss doubles
    assert f["continuations_changed"] == 1 and f["entropy_after"] < f["entropy_before"]
    assert math.isclose(f["perplexity_after"], math.exp(2.0)) and math.isclose(f["perplexity_before"], math.exp(1.0))
    summary = (tmp_path / "seq" / "out" / "summary.md").read_text()
    assert "## Fluency (neutral text)" in summary and "| 1 of 2 |" in summary


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
