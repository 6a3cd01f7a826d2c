"""Record checks, the records a run edits, and the scores and spread the summary shows (pure, no model)."""
from __future__ import annotations

import pytest

from memoe_plugin.eval.compare import CompareError, prepare_records, request_kwargs
from memoe_plugin.eval.compare.report import combine_seeds, markdown_summary
from memoe_plugin.eval.metrics import aggregate, case_scores
from memoe_plugin.eval.splits import split_of
from memoe_plugin.eval.validate import check_records, describe, record_problems


def record(i, **changes):
    base = {"case_id": i, "prompt": f"Where does Person{i} live?", "target_new": f"Town{i}", "subject": f"Person{i}",
            "rephrase_prompt": f"Person{i} lives where?",
            "same_subject": [(f"Person{i} works as", "baker"), (f"Person{i} was born in", "1900")]}
    base.update(changes)
    return base


def test_record_problems_name_each_reason():
    assert record_problems(record(0)) == []
    assert record_problems(record(0, target_new="")) == ["'target_new' is missing, empty or not a string ('')"]
    assert "not a string (None)" in record_problems(record(0, subject=None))[0]
    assert "does not occur in the prompt" in record_problems(record(0, subject="Nobody"))[0]
    assert record_problems(record(0, rephrase_prompt=" "), needs=("rephrase_prompt",)) == [
        "'rephrase_prompt' is missing or empty, and this run scores it"]
    both = record_problems(record(0, locality_prompt="Who?"), needs=("locality_prompt",))
    assert both == ["'locality_ground_truth' is missing or empty"]


def test_check_records_skips_repeats_of_a_usable_prompt_only():
    records = [record(0), record(1, target_new=""), record(2, prompt=record(0)["prompt"], subject="Person0"),
               record(3, prompt=record(1)["prompt"], subject="Person1"), record(4, target_new="Town0",
                                                                              prompt=record(0)["prompt"],
                                                                              subject="Person0")]
    usable, problems = check_records(records)
    assert usable == [0, 3]              # record 3 repeats an unusable record's prompt: it is the first usable one
    assert [(p.index, p.record_id) for p in problems] == [(1, 1), (2, 2), (4, 4)]
    assert "repeats record 0's with another target ('Town0')" in problems[1].reason
    assert "with the same target (a duplicate)" in problems[2].reason
    assert describe(problems, limit=2).splitlines()[-1] == "... and 1 more"


def test_prepare_records_splits_samples_and_gives_unrelated_locality_from_records_not_edited():
    records = [record(i) for i in range(200)]
    test = prepare_records(records, 20, "test")
    dev = prepare_records(records, 20, "dev")
    assert all(split_of(r) == "test" for r in test.edits) and all(split_of(r) == "dev" for r in dev.edits)
    assert not {r["prompt"] for r in test.edits} & {r["prompt"] for r in dev.edits}
    assert test.available + dev.available == 200 and test.skipped == []
    assert [r["case_id"] for r in test.edits] == [r["case_id"] for r in records if split_of(r) == "test"][:20]
    seeded = [prepare_records(records, 20, "test", seed) for seed in (0, 1, 0)]
    ids = [[r["case_id"] for r in p.edits] for p in seeded]
    assert ids[0] == ids[2] != ids[1] and ids[0] == sorted(ids[0])
    edited = {r["subject"] for r in test.edits}
    for r in test.edits:                 # KnowEdit records lack an unrelated prompt: another record's question
        assert r["locality_prompt"].split()[0] not in edited
        assert r["locality_ground_truth"] in ("baker",)
    assert all(text.endswith("baker") for text in test.loc_prompts)
    assert "_index" not in test.edits[0]


def test_prepare_records_strict_and_too_few():
    records = [record(i) for i in range(10)] + [record(10, target_new=" ")]
    loose = prepare_records(records, 5)
    assert [p.index for p in loose.skipped] == [10] and loose.available == 10
    with pytest.raises(CompareError, match=r"1 of the 11 all records cannot be used \(--strict\):\nrecord 10"):
        prepare_records(records, 5, strict=True)
    with pytest.raises(CompareError, match="has 10 usable records .1 skipped.; --num-edits asks for 11"):
        prepare_records(records, 11)
    # indices in problems are positions in the file, also within a split
    in_test = [i for i, r in enumerate(records) if split_of(r) == "test"]
    bad = list(records)
    bad[in_test[-1]] = dict(bad[in_test[-1]], target_new="")
    assert [p.index for p in prepare_records(bad, 2, "test").skipped] == [in_test[-1]]


def test_request_kwargs_pass_same_subject_prompts_as_relation_specificity_lists():
    records = [record(0, locality_prompt="Who wrote Hamlet?", locality_ground_truth="Shakespeare"),
               record(1, same_subject=[], locality_prompt="Who?", locality_ground_truth="Me")]
    kwargs = request_kwargs(records, ["x", "y"])
    rs = kwargs["locality_inputs"]["Relation_Specificity"]
    assert rs["prompt"] == [["Person0 works as", "Person0 was born in"], None]
    assert rs["ground_truth"] == [["baker", "1900"], None]
    assert kwargs["locality_inputs"]["neighborhood"]["prompt"] == ["Who wrote Hamlet?", "Who?"]
    assert "Relation_Specificity" not in request_kwargs([records[1]], ["y"])["locality_inputs"]
    assert "portability_inputs" not in kwargs
    records[0]["portability"] = {"Reasoning": [("Person0's town is in", "Wales")]}
    assert request_kwargs(records, ["x", "y"])["portability_inputs"] == {
        "Reasoning": {"prompt": [["Person0's town is in"], None], "ground_truth": [["Wales"], None]}}


def metric(rewrite, rephrase, neighborhood=None, same=None):
    locality = {}
    if neighborhood is not None:
        locality["neighborhood_acc"] = [neighborhood]
    if same is not None:
        locality["Relation_Specificity_acc"] = [same]
    return {"post": {"rewrite_acc": [rewrite], "rephrase_acc": [rephrase], "locality": locality}}


def test_same_subject_locality_is_its_own_column_and_joins_the_average():
    assert case_scores(metric(1, 0.5, [1.0], [0.0, 0.5])) == {"reliability": 1.0, "generality": 0.5,
                                                             "locality": 1.0, "same_subject": 0.25}
    three = aggregate([metric(1, 0.5, [1.0])])
    assert three["same_subject"] is None and three["average"] == pytest.approx(250 / 3)
    four = aggregate([metric(1, 0.5, [1.0], [0.0, 0.5])])
    assert four["average"] == pytest.approx((100 + 50 + 100 + 25) / 4)


def row(seed, reliability, generality, same_subject=None):
    return {"dataset": "zsre-knowedit", "protocol": "batch", "batch_size": 30, "num_edits": 60, "method": "MEMoE",
            "split": "test", "seed": seed, "status": "complete", "cases": 60, "reliability": reliability,
            "generality": generality, "locality": 100.0, "same_subject": same_subject, "average": 90.0,
            "edit_seconds": 10.0, "seconds_per_edit": 0.2, "rollback": "exact", "error": "", "note": ""}


def test_seeds_combine_into_mean_and_standard_deviation():
    combined = combine_seeds([row(0, 100.0, 80.0, 90.0), row(1, 98.0, 84.0, 96.0), row(2, 99.0, 88.0, 93.0)])
    assert len(combined) == 1
    c = combined[0]
    assert c["seeds"] == [0, 1, 2] and c["cases"] == 180
    assert c["generality"] == pytest.approx(84.0) and c["generality_sd"] == pytest.approx(4.0)
    assert c["generality_seeds"] == [80.0, 84.0, 88.0]
    text = markdown_summary([row(0, 100.0, 80.0, 90.0), row(1, 98.0, 84.0, 96.0)])
    assert "| MEMoE | 99.0 ± 1.4 | 82.0 ± 2.8 | 100.0 ± 0.0 | 93.0 ± 4.2 |" in text
    assert "test split, seeds 0, 1" in text and "Same-subj." in text
    single = combine_seeds([dict(row(None, 100.0, 80.0), split="all")])
    assert single[0].get("generality_sd") is None
