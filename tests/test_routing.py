"""The same text gets the same routing on every path the model can be run."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.model import MEMoEAdapter

PROMPTS = ["The mother tongue of Danielle Darrieux is", "What university did Watts Humphrey attend?",
           "Toko Yasuda plays the"]


@pytest.fixture(params=["anchor", "sentence", "token"])
def edited(request, tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=30, routing_input=request.param))
    yield model, get_adapter(model)
    remove_memoe(model)


def test_anchor_is_the_mean_of_entity_embeddings(tokenizer):
    model = tiny_llama(len(tokenizer))
    adapter = MEMoEAdapter.attach(model, tokenizer, make_hparams())
    try:
        text = "Marie Curie was born in Warsaw"
        ids = tokenizer(text)["input_ids"]
        features = adapter.encoder.features(ids)
        table = model.get_input_embeddings().weight

        def entity_vector(entity):
            return table[tokenizer(entity, add_special_tokens=False)["input_ids"]].mean(0)

        expected = torch.stack([entity_vector("Marie Curie"), entity_vector("Warsaw")]).mean(0)
        assert torch.allclose(features[-1], expected, atol=1e-6)
        # before any entity appears in the prefix, the anchor is zero
        early = adapter.encoder.features(tokenizer("the capital of Japan is")["input_ids"])
        assert torch.count_nonzero(early[0]) == 0
        assert torch.allclose(early[-1], entity_vector("Japan"), atol=1e-6)
    finally:
        adapter.detach()


def test_in_forward_recovery_equals_direct_extraction(tokenizer):
    model = tiny_llama(len(tokenizer))
    adapter = MEMoEAdapter.attach(model, tokenizer, make_hparams())
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
            features, _, _ = adapter.routing_features(batch["input_ids"], batch["attention_mask"])
            for row, prompt in enumerate(PROMPTS):
                ids = tokenizer(prompt)["input_ids"]
                real = batch["attention_mask"][row].bool()
                assert torch.equal(features[row, real], adapter.encoder.features(ids)), (side, prompt)
                assert torch.count_nonzero(features[row, ~real]) == 0
    finally:
        tokenizer.padding_side = "left"
        adapter.detach()


def test_answer_tokens_do_not_change_the_prompt_anchor(tokenizer):
    model = tiny_llama(len(tokenizer))
    adapter = MEMoEAdapter.attach(model, tokenizer, make_hparams())
    try:
        for request in EDITS:
            prompt_ids = tokenizer(request["prompt"])["input_ids"]
            full_ids = tokenizer(request["prompt"] + " " + request["target_new"])["input_ids"]
            assert full_ids[:len(prompt_ids)] == prompt_ids
            assert torch.equal(adapter.encoder.features(full_ids)[:len(prompt_ids)],
                               adapter.encoder.features(prompt_ids))
    finally:
        adapter.detach()


def test_generate_matches_teacher_forcing(edited, tokenizer):
    model, adapter = edited
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False,
                                  pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(generated, uncached)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            teacher = model(input_ids=generated).logits[0].argmax(-1)
        assert teacher[n - 1:-1].tolist() == generated[0, n:].tolist()


def test_padded_batches_route_like_single_prompts(edited, tokenizer):
    model, adapter = edited
    singles = []
    for prompt in PROMPTS:
        routing = adapter.route(tokenizer(prompt, return_tensors="pt")["input_ids"])
        singles.append(routing[0])
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(**batch, position_ids=position_ids, use_cache=False)
        routing = adapter.bypass.last_routing
        for row, single in enumerate(singles):
            real = batch["attention_mask"][row].bool()
            assert torch.equal(routing[row, real], single), (side, PROMPTS[row])
    tokenizer.padding_side = "left"


def test_batched_generate_matches_single_generate(edited, tokenizer):
    model, _ = edited
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
        assert together[row, width:].tolist() == alone[0, -5:].tolist(), prompt


def test_beam_search_is_refused_clearly(edited, tokenizer):
    model, _ = edited
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), num_beams=2, max_new_tokens=2)


def test_anchor_cache_is_bounded_and_reused(tokenizer):
    model = tiny_llama(len(tokenizer))
    adapter = MEMoEAdapter.attach(model, tokenizer, make_hparams(anchor_cache_size=3))
    try:
        encoder = adapter.encoder
        ids = tokenizer(PROMPTS[0])["input_ids"]
        encoder.features(ids)
        calls = encoder.extractor_calls
        encoder.features(ids)
        assert encoder.extractor_calls == calls        # cached: no new NER
        encoder.features(ids + [5])
        assert encoder.extractor_calls == calls + 1    # one more token: one more NER call
        for prompt in PROMPTS * 3:
            encoder.features(tokenizer(prompt + " x")["input_ids"])
        assert len(encoder._entity_runs) <= 3
    finally:
        adapter.detach()


def test_inputs_embeds_without_ids_is_refused(tokenizer):
    model = tiny_llama(len(tokenizer))
    adapter = MEMoEAdapter.attach(model, tokenizer, make_hparams())
    try:
        embeds = model.get_input_embeddings()(tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds)
    finally:
        adapter.detach()


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


def test_replay_trains_earlier_edits_again(tokenizer):
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=3, replay=2)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    from memoe_plugin.main import replayed_edits
    adapter = get_adapter(model)
    assert len(replayed_edits(adapter.edits, hp)) == 2
    assert replayed_edits(adapter.edits, make_hparams(replay=0)) == []
    seen = []
    import memoe_plugin.main as main_module
    real = main_module.train_experts
    main_module.train_experts = lambda adapter, batch, progress=False: seen.append(batch) or real(adapter, batch)
    try:
        apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)
    finally:
        main_module.train_experts = real
    assert [r["prompt"] for r in seen[0]][:1] == [EDITS[2]["prompt"]] and len(seen[0]) == 3
    assert {r["prompt"] for r in seen[0][1:]} == {e["prompt"] for e in EDITS[:2]}
    remove_memoe(model)


def test_gate_token_weight_zero_routes_on_the_anchor_alone(tokenizer):
    """With the token part of R(x) weighted 0, prompts sharing their entities share their expert."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=20, num_experts=4, gate_token_weight=0.0)
    apply_memoe_to_model(model, tokenizer, EDITS, hp)
    adapter = get_adapter(model)
    pairs = [("What university did Watts Humphrey attend?", "Which college did Watts Humphrey go to?"),
             ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux, a native speaker of"),
             ("Toko Yasuda plays the", "The instrument that Toko Yasuda plays is the")]
    last = lambda text: adapter.route(torch.tensor([tokenizer(text)["input_ids"]]))[0, -1, 0].item()
    for edit, rephrase in pairs:
        assert last(edit) == last(rephrase), (edit, rephrase)
    # and the gate input really is (R(x) - shift) * scale with the token part scaled to 0
    in_features = adapter.bypass.experts.shape[1]
    assert torch.count_nonzero(adapter.bypass.gate_scale[:in_features]) == 0
    remove_memoe(model)


def test_centred_gate_calibrates_on_the_edited_tokens(tokenizer):
    """gate_norm: center: the token part is centred on the edits' layer inputs, the anchor part on
    the embedding table, each scaled to unit RMS."""
    model = tiny_llama(len(tokenizer))
    captured = []
    hp = make_hparams(steps=5, gate_norm="center")
    apply_memoe_to_model(model, tokenizer, EDITS, hp)
    adapter = get_adapter(model)
    bypass = adapter.bypass
    handle = bypass.base.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    bypass.enabled = False
    from memoe_plugin.train import build_edit_batches
    batches = build_edit_batches(tokenizer, EDITS, "cpu")
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    bypass.enabled = True
    handle.remove()
    x = torch.cat([h[b.attention_mask.bool()] for h, b in zip(captured, batches)])
    in_features = x.shape[-1]
    assert torch.allclose(bypass.gate_shift[:in_features], x.mean(0), atol=1e-5)
    rms = (x - x.mean(0)).pow(2).mean().sqrt()
    assert torch.allclose(bypass.gate_scale[:in_features], 1 / rms, rtol=1e-4)
    table = model.get_input_embeddings().weight
    assert torch.allclose(bypass.gate_shift[in_features:], table.mean(0), atol=1e-6)
    remove_memoe(model)
