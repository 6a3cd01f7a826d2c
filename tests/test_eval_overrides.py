"""The one key=value parser of every command."""
import pytest

from memoe_plugin.eval.overrides import OverrideError, load_hparams, parse_assignments, parse_method_assignments


def test_values_are_yaml_and_scientific_strings_become_floats():
    assert parse_assignments(["lr=1e-3", "steps=80", "locality_guard=false", "anchor_backend=offline"]) == \
        {"lr": 0.001, "steps": 80, "locality_guard": False, "anchor_backend": "offline"}
    assert parse_assignments(["note=a=b"]) == {"note": "a=b"}
    with pytest.raises(OverrideError, match="key=value"):
        parse_assignments(["lr"])


def test_method_assignments_match_names_in_any_case():
    assert parse_method_assignments(["ft-l.steps=20", "WISE.n_iter=5"], ["FT-L", "WISE"]) == \
        {"FT-L": {"steps": 20}, "WISE": {"n_iter": 5}}
    with pytest.raises(OverrideError, match="unknown method 'ROME'"):
        parse_method_assignments(["ROME.steps=3"], ["FT-L"])
    with pytest.raises(OverrideError, match="METHOD.key=value"):
        parse_method_assignments(["steps=3"], ["FT-L"])


def test_load_hparams_takes_a_shipped_name_and_applies_overrides():
    hp = load_hparams("gpt2-xl", ["lr=1e-3"], device="cpu", model_name=None)
    assert hp.layer == 33 and hp.lr == 0.001 and hp.device == "cpu" and hp.model_name == "./hugging_cache/gpt2-xl"
    with pytest.raises(ValueError, match="num_experts"):
        load_hparams("gpt2-xl", ["num_experts=0"])
