"""The locality guard: silent, bit for bit, where no edited knowledge is in sight."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe

PROMPTS = ["The mother tongue of Danielle Darrieux is", "What university did Watts Humphrey attend?",
           "Toko Yasuda plays the"]


def test_locality_guard_silences_unrelated_inputs_exactly(tokenizer):
    model = tiny_llama(len(tokenizer))
    unrelated = ["The capital of France is Paris", "Who is the father of Marie Curie?"]
    before = model(**tokenizer(unrelated, return_tensors="pt", padding=True)).logits
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=40, locality_guard=True))
    adapter = get_adapter(model)
    assert {"danielle darrieux", "japan", "toko yasuda"} <= adapter.guard.keys
    with torch.no_grad():
        after = model(**tokenizer(unrelated, return_tensors="pt", padding=True)).logits
    assert torch.equal(after, before)                 # bit-exact: no expert ran
    routing = adapter.route(tokenizer(unrelated[:1], return_tensors="pt")["input_ids"])
    assert (routing == -1).all()
    # a rephrase that names the edited subject is active from the subject on
    ids = tokenizer("Where does Toko Yasuda live?")["input_ids"]
    flags = adapter.guard.active(ids)
    assert not flags[0] and flags[-1] and flags == sorted(flags)
    for request in EDITS:                             # the edits themselves still took
        full = tokenizer(request["prompt"] + " " + request["target_new"], return_tensors="pt")
        n = len(tokenizer(request["prompt"])["input_ids"])
        with torch.no_grad():
            predicted = model(**full).logits[0].argmax(-1)[n - 1:-1]
        assert predicted.tolist() == full["input_ids"][0, n:].tolist()
    remove_memoe(model)


def test_locality_guard_needs_an_anchor_or_subject(tokenizer):
    model = tiny_llama(len(tokenizer))
    request = {"prompt": "the colour of the sky is", "target_new": "green"}
    with pytest.raises(ValueError, match="needs a knowledge anchor.*subject"):
        apply_memoe_to_model(model, tokenizer, [request], make_hparams(locality_guard=True))
    assert get_adapter(model) is None
    apply_memoe_to_model(model, tokenizer, [dict(request, subject="sky")],
                         make_hparams(locality_guard=True, steps=2))
    assert get_adapter(model).guard.keys == {"sky"}
    remove_memoe(model)


def test_guard_generate_matches_teacher_forcing(tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=30, locality_guard=True))
    for prompt in PROMPTS + ["the capital of Japan is"]:
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            teacher = model(input_ids=generated).logits[0].argmax(-1)
        assert teacher[n - 1:-1].tolist() == generated[0, n:].tolist()
    remove_memoe(model)


def test_guard_compiles_its_pattern_once_per_use_and_forgets_restored_keys(tokenizer, monkeypatch):
    """Keys arrive edit by edit; the pattern is built when a match needs it, not at every add (that cost
    grew with every edit kept). A restore drops what the removed keys matched, even to no key at all."""
    from memoe_plugin.routing import guard as guard_module
    guard = guard_module.LocalityGuard(tokenizer)
    compiled = []
    real = guard_module.AnchorIndex
    monkeypatch.setattr(guard_module, "AnchorIndex", lambda keys: compiled.append(keys) or real(keys))
    empty = guard.state()
    for edit, key in enumerate(["Danielle Darrieux", "Toko Yasuda", "Watts Humphrey"]):
        guard.add([key], edit)
    assert compiled == []
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert guard.active(ids)[-1] and guard.edits_in_sight(ids)[-1] == {0}
    assert len(compiled) == 1
    guard.active(tokenizer(PROMPTS[2])["input_ids"])
    assert len(compiled) == 1                          # keys unchanged: the same pattern
    guard.restore(empty)
    assert not any(guard.active(ids))                  # not the cached answer of the dropped key


def _alternation_find(keys, text):
    """What the guard used to run: one regex alternation of every anchor, longest first, as whole words."""
    import re
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(keys, key=len, reverse=True))) + r")(?!\w)")
    return frozenset(match.group(0) for match in pattern.finditer(text))


def test_anchor_index_finds_what_the_regex_alternation_finds():
    """Random anchors and texts built from overlapping words, punctuation inside and around anchors, non-ASCII
    letters and anchors that are prefixes of one another: the index and the alternation agree on every one."""
    import random
    from memoe_plugin.routing.guard import AnchorIndex
    rng = random.Random(0)
    words = ["new", "york", "city", "paris", "par", "is", "de", "la", "st", "john's", "church", "(a)", "ab-c",
             "ab", "c", "x_y", "é", "bagnères", "ä", "1990", "«cyrano»"]
    seps = [" ", " ", ", ", "-", "'", ".", "(", ")", ""]
    found_any = 0
    for _ in range(1500):
        keys = {"".join(rng.choice(words) + (rng.choice(seps) if i < n - 1 else "") for i in range(n)).strip()
                for n in [rng.randint(1, 3) for _ in range(rng.randint(1, 8))]} - {""}
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 15)))
        expected = _alternation_find(keys, text)
        assert AnchorIndex(keys).find(text) == expected, (keys, text)
        found_any += bool(expected)
    assert found_any > 300                             # the cases are not all misses
    # longest anchor at a position wins and the scan resumes after it, as in the alternation
    assert AnchorIndex({"new york", "york city", "new"}).find("new york city") == {"new york"}
    assert AnchorIndex({"paris"}).find("parisian paris.") == {"paris"}
