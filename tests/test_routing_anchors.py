"""The same text gets the same routing on every path the model can be run."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.adapter import MEMoEAdapter

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
            features = adapter.routing_features(batch["input_ids"], batch["attention_mask"]).features
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
        with torch.no_grad(), adapter.recording() as outputs:
            model(**batch, position_ids=position_ids, use_cache=False)
        routing = outputs[-1].routing
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
