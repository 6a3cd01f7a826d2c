"""Synthetic facts for load tests: distinct invented subjects, well-formed requests."""
import pytest

from memoe_plugin.eval.synthetic import NAMES, invented_subject, synthetic_facts


def test_invented_subjects_are_distinct_two_word_names():
    names = [invented_subject(i) for i in range(50_000)]
    assert len(set(names)) == len(names)
    assert all(len(n.split()) == 2 and n.istitle() for n in names[:100])
    assert invented_subject(NAMES - 1) != invented_subject(0)
    with pytest.raises(ValueError, match="outside"):
        invented_subject(NAMES)


def test_synthetic_facts_name_their_subject_and_are_reproducible():
    facts = synthetic_facts(20, seed=3, first=100)
    assert facts == synthetic_facts(20, seed=3, first=100)
    assert all(f["subject"] in f["prompt"] and f["target_new"] for f in facts)
    assert {f["subject"] for f in facts} == {invented_subject(i) for i in range(100, 120)}
