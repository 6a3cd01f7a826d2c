"""memoe-compare, resume.py: what is done (--resume), the sequential checkpoints, and the settings digest."""
from __future__ import annotations

import pytest

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from memoe_plugin.eval.compare import ResultStore
from compare_fakes import DigestBackend, FakeBackend, results, rows_by_method, run_main


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


def test_sequential_resume_restarts_an_unfinished_method(tmp_path):
    assert run_main(tmp_path, FakeBackend(interrupt_at=2), "--methods", "MEMoE", "--protocol", "sequential",
                    "--num-edits", "4", "--batch-size", "2") == 130
    backend = FakeBackend()
    assert run_main(tmp_path, backend, "--methods", "MEMoE", "--protocol", "sequential", "--num-edits", "4",
                    "--batch-size", "2", "--resume") == 0
    assert len(backend.calls) == 2
    row = rows_by_method(tmp_path)["MEMoE"]
    assert row["status"] == "complete" and row["cases"] == 4


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
