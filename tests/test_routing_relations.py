"""The relation bank: prompts about an edit's subject that ask for other relations (the anti-keys' text)."""
from memoe_plugin.routing.relations import (CLOZE, OTHER_RELATION, RELATIONS, SAME_FRAME, anti_key_prompts,
                                            named_relation, same_relation_rewordings)


def test_a_prompt_that_names_its_relation_gets_other_relations_as_cloze_and_in_its_own_words():
    prompts = anti_key_prompts("The name of the employer of Ada Lovelace is", "Ada Lovelace")
    texts = {p.text for p in prompts}
    assert "The place of birth of Ada Lovelace is" in texts                       # the cloze, another relation
    assert "The name of the place of birth of Ada Lovelace is" in texts           # the edit's own words
    assert not any(p.relation == "employer" for p in prompts)                     # never its own relation
    assert {p.kind for p in prompts} == {OTHER_RELATION, SAME_FRAME}
    assert len(texts) == len(prompts)                                             # each asked once


def test_the_subject_is_not_read_as_a_relation_and_a_prompt_in_cloze_form_is_asked_once():
    # "Founder" in the subject is not the relation; "occupation" is
    assert named_relation("The occupation of Founder Smith is", "Founder Smith").group(0) == "occupation"
    prompts = anti_key_prompts("The occupation of Founder Smith is", "Founder Smith")
    assert all(p.kind == OTHER_RELATION for p in prompts)     # its own words are the cloze's: nothing to add
    assert any(p.text == "The founder of Founder Smith is" for p in prompts)


def test_without_a_named_relation_only_the_cloze_prompts_and_without_a_subject_none():
    prompts = anti_key_prompts("Ada Lovelace was born in", "Ada Lovelace")
    assert prompts and all(p.kind == OTHER_RELATION for p in prompts)
    assert len(prompts) == len(RELATIONS)
    assert prompts[0].text == CLOZE.format(label=next(iter(RELATIONS.values()))[0], subject="Ada Lovelace")
    assert anti_key_prompts("Ada Lovelace was born in", None) == []
    assert anti_key_prompts("Ada Lovelace was born in", "  ") == []


def test_relations_caps_the_bank_at_its_most_common_relations():
    first = list(RELATIONS)[:5]
    prompts = anti_key_prompts("The gender of Ada Lovelace is", "Ada Lovelace", relations=5)
    assert {p.relation for p in prompts} == set(first) - {"gender"}


def test_a_label_several_relations_share_keeps_all_of_them_out():
    # "language" names both a work's original language and a place's official language: neither is asked
    prompts = anti_key_prompts("The language of Ada Lovelace is", "Ada Lovelace")
    asked = {p.relation for p in prompts}
    assert "original language" not in asked and "official language" not in asked and "gender" in asked


def test_same_relation_rewordings_swap_in_the_relations_other_labels():
    assert same_relation_rewordings("The place of birth of Marie Curie is", "Marie Curie") == [
        "The birthplace of Marie Curie is", "The city of birth of Marie Curie is"]
    assert same_relation_rewordings("What team is Nicolas Raffault associated with?", "Nicolas Raffault") == [
        "What club is Nicolas Raffault associated with?", "What current club is Nicolas Raffault associated with?"]


def test_same_relation_rewordings_need_a_label_of_one_relation_outside_the_subject():
    assert same_relation_rewordings("Toko Yasuda plays the", "Toko Yasuda") == []          # no label
    assert same_relation_rewordings("The language of Re! was", "Re!") == []               # 'language': several
    assert same_relation_rewordings("Where is Capital Records based?", "Capital Records") == []  # in the subject
