"""Request files in EasyEdit's record formats, normalised to one flat shape."""
import json

import pytest

from memoe_plugin.eval.records import easyedit_locality, load_requests, normalise_record


def test_zsre_knowedit_and_flat_records_normalise_alike():
    zsre = {"src": "Which family does Epaspidoceras belong to?", "alt": "Noctuidae", "subject": "Epaspidoceras",
            "answers": ["Aspidoceratidae"], "rephrase": "What family are Epaspidoceras?", "loc": "nq question: x",
            "loc_ans": "y"}
    knowedit = {"prompt": zsre["src"], "target_new": "Noctuidae", "subject": "Epaspidoceras",
                "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": zsre["rephrase"],
                "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                       "ground_truth": ["genus"]}]}}
    a, b = normalise_record(zsre), normalise_record(knowedit)
    assert a["prompt"] == b["prompt"] and a["target_new"] == b["target_new"] == "Noctuidae"
    assert a["ground_truth"] == b["ground_truth"] == "Aspidoceratidae"
    assert b["locality_prompt"] == "The taxon rank of Epaspidoceras is" and b["locality_ground_truth"] == "genus"
    assert easyedit_locality([a]) == {"neighborhood": {"prompt": ["nq question: x"], "ground_truth": ["y"]}}
    assert easyedit_locality([{"prompt": "p", "target_new": "t"}]) is None


def test_bad_records_and_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="record 3: needs 'prompt' and 'target_new'"):
        normalise_record({"question": "?"}, 3)
    with pytest.raises(ValueError, match="'target_new' must be a non-empty string"):
        normalise_record({"prompt": "p", "target_new": " "})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_requests(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_requests(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"prompt": f"p{i}", "target_new": "t"} for i in range(5)]))
    assert len(load_requests(good, limit=2)) == 2
