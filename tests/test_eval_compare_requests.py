"""memoe-compare, requests.py: the records a run edits (checked, skipped, drawn) and the combined restore handle."""
from __future__ import annotations

import pytest
import torch

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from memoe_plugin.eval.compare import CompareError, combine_restore, prepare_records
from compare_fakes import FakeBackend, fake_records, results, rows_by_method, run_main


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
