"""The gate's options (anchor-led routing, centring) and replay of earlier edits."""
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe

PROMPTS = ["The mother tongue of Danielle Darrieux is", "What university did Watts Humphrey attend?",
           "Toko Yasuda plays the"]


def test_replay_trains_earlier_edits_again(tokenizer):
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=3, replay=2)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    from memoe_plugin.apply import replayed_edits
    adapter = get_adapter(model)
    assert len(replayed_edits(adapter.edits, hp)) == 2
    assert replayed_edits(adapter.edits, make_hparams(replay=0)) == []
    seen = []
    import memoe_plugin.apply as main_module
    real = main_module.train_experts
    main_module.train_experts = lambda adapter, batch, progress=False, **kw: seen.append(batch) or real(adapter, batch)
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
    from memoe_plugin.training.batches import build_edit_batches
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
