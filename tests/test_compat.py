"""Following the KV cache on every transformers release: names, positions, and what cannot be renamed."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.compat import (CacheNotFollowedError, bound_arguments, cache_argument_name, continuation_length,
                                 in_range, output_cache)


def _cache(model, tokenizer, text):
    out = model(**tokenizer(text, return_tensors="pt"), use_cache=True)
    return output_cache(out)


def test_continuation_is_read_from_the_mask_and_checked_against_the_cache(tokenizer):
    model = tiny_llama(len(tokenizer))
    cache = _cache(model, tokenizer, "The capital of Japan is")
    n = cache.get_seq_length()
    ids = torch.tensor([[5]])
    mask = torch.ones(1, n + 1, dtype=torch.long)
    # the cache under each name it has had, under a name nobody uses, or no cache at all: same answer
    for name in ("cache", "past_key_values", "some_future_name"):
        assert continuation_length({"attention_mask": mask, name: cache}, ids) == n
    assert continuation_length({"attention_mask": mask}, ids) == n
    assert continuation_length({"cache": cache}, ids) == n            # no mask: the cache alone
    assert continuation_length({"attention_mask": torch.ones(1, 1)}, ids) == 0
    assert continuation_length({}, ids) == 0
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    assert continuation_length({"past_key_values": legacy}, ids) == n
    with pytest.raises(CacheNotFollowedError, match="cannot tell"):   # mask and cache disagree
        continuation_length({"attention_mask": torch.ones(1, 1), "cache": cache}, ids)
    with pytest.raises(CacheNotFollowedError, match="2-D"):
        continuation_length({"attention_mask": torch.ones(1, 1, 1, n + 1)}, ids)


def test_positional_arguments_are_named_from_the_signature(tokenizer):
    model = tiny_llama(len(tokenizer))
    ids, mask = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    bound = bound_arguments(model, (ids, mask), {})
    assert bound["input_ids"] is ids and bound["attention_mask"] is mask
    assert cache_argument_name(model) in ("cache", "past_key_values")


def _generation_and_teacher_routing(model, adapter, tokenizer, prompt, new_tokens=6):
    inputs = tokenizer(prompt, return_tensors="pt")
    with adapter.recording() as outputs:
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
    steps = [out.routing[:, -1] for out in outputs]
    assert len(steps) == new_tokens    # one call for the prompt, then one per new token through the cache
    n = inputs["input_ids"].shape[1]
    teacher = adapter.route(generated)[0]
    return torch.stack([s[0] for s in steps]), teacher[n - 1:n - 1 + new_tokens]


PROMPTS = ["The mother tongue of Danielle Darrieux is", "Tell me: Toko Yasuda plays the",
           "What university did Watts Humphrey attend?", "In Wales, the capital of Japan is"]


@pytest.mark.parametrize("guard", [False, True])
def test_kv_cache_generation_routes_like_teacher_forcing(tokenizer, guard, monkeypatch):
    """Expert by expert, every generated position routes as the teacher-forced pass over the same text.

    The gate routes on the anchor alone (token weight 0, gate kept at its random start), so a step
    that lost its prefix would see no entity and route differently: the second half checks that
    the comparison does catch that."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=5, locality_guard=guard, gate_token_weight=0.0, gate_lr_scale=0.0)
    apply_memoe_to_model(model, tokenizer, EDITS, hp)
    adapter = get_adapter(model)
    try:
        for prompt in PROMPTS:
            cached, teacher = _generation_and_teacher_routing(model, adapter, tokenizer, prompt)
            assert torch.equal(cached, teacher), prompt
        # negative control: a hook that treats every cached step as a fresh sequence routes differently
        import memoe_plugin.adapter as model_module
        monkeypatch.setattr(model_module, "continuation_length", lambda bound, ids: 0)
        differs = [not torch.equal(*_generation_and_teacher_routing(model, adapter, tokenizer, p)) for p in PROMPTS]
        assert any(differs)
    finally:
        remove_memoe(model)


def test_a_cache_that_does_not_continue_the_last_call_is_refused(tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=2))
    try:
        cache = _cache(model, tokenizer, "The capital of Japan is")
        model(**tokenizer("Toko Yasuda", return_tensors="pt"))          # another call in between
        n = cache.get_seq_length()
        with pytest.raises(CacheNotFollowedError, match="cannot follow"):
            model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                  **{cache_argument_name(model): cache})
    finally:
        remove_memoe(model)


def test_version_ranges():
    assert in_range("5.5.4", ("5.5.4", "5.25")) and in_range("5.25.3", ("5.5.4", "5.25"))
    assert not in_range("5.5.3", ("5.5.4", "5.25")) and not in_range("5.26.0", ("5.5.4", "5.25"))
    assert in_range("2.14.1+cu130", ("2.14", "2.15")) and in_range("2.15.0", ("2.14", "2.15"))
    assert not in_range("2.16.0", ("2.14", "2.15")) and not in_range("2.13.0+cpu", ("2.14", "2.15"))


def test_the_declared_lower_bounds_and_the_pins_are_the_tested_range(monkeypatch):
    """setup.cfg declares lower bounds only (the plugin installs beside newer stacks), the constraints file pins
    the newest tested releases, and compat warns outside that range without refusing."""
    import configparser
    import re
    import transformers
    from conftest import REPO
    from memoe_plugin import compat
    requires = configparser.ConfigParser()
    requires.read(REPO / "setup.cfg")
    lines = [line.strip() for line in requires["options"]["install_requires"].splitlines() if line.strip()
             and not line.strip().startswith("#")]
    assert f"transformers>={compat.TESTED_TRANSFORMERS[0]}" in lines
    assert f"torch>={compat.TESTED_TORCH[0]}" in lines
    assert not any("<" in line or "==" in line for line in lines), lines          # no upper caps, no pins
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)", (REPO / "scripts" / "constraints.txt").read_text(), re.M))
    assert in_range(pins["transformers"], compat.TESTED_TRANSFORMERS)
    assert pins["transformers"].startswith(compat.TESTED_TRANSFORMERS[1])
    assert pins["torch"].startswith(compat.TESTED_TORCH[1])
    assert compat.warn_if_untested() is None                 # the running stack is a tested one
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.warns(UserWarning, match=r"transformers 6.0.0 \(tested: 5.5.4 to 5.25\)"):
        assert "not tested" in compat.warn_if_untested()


def test_a_tokenizer_that_loses_spaces_is_refused_at_attach(tokenizer):
    """Anchors are read from decoded ids: a decode that drops spaces must stop the edit, not run silently."""
    import copy
    from tokenizers import decoders
    from memoe_plugin.routing.anchors import TokenizerRoundTripError
    from memoe_plugin.adapter import MEMoEAdapter
    broken = copy.deepcopy(tokenizer)
    broken.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(" ", "")])
    assert broken.decode(broken("a b")["input_ids"]) == "ab"
    model = tiny_llama(len(tokenizer))
    for settings in ({}, {"routing_input": "token", "locality_guard": True}):
        with pytest.raises(TokenizerRoundTripError, match="tiny-llama.*does not give text back.*--overwrite"):
            MEMoEAdapter.attach(model, broken, make_hparams(**settings))
        assert get_adapter(model) is None
    adapter = MEMoEAdapter.attach(model, broken, make_hparams(routing_input="token"))   # no decoding needed
    adapter.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_lm_head_on_the_last_columns_gives_those_columns_logits(arch, tokenizer):
    """``last_logits_only`` (transformers' ``logits_to_keep``) is taken by the causal LMs of both tested stacks and
    gives the last columns' logits of a full pass, unchanged."""
    from conftest import tiny_gpt2, tiny_llama
    from memoe_plugin.compat import last_logits_only
    model = tiny_llama(len(tokenizer)) if arch == "llama" else tiny_gpt2(len(tokenizer))
    inputs = tokenizer(["The capital of Japan is Warsaw", "Toko Yasuda plays"], return_tensors="pt", padding=True)
    keyword = last_logits_only(model, 3)
    assert keyword == {"logits_to_keep": 3}
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, **keyword).logits
    assert last.shape[1] == 3 and torch.allclose(last, full[:, -3:], atol=1e-5)
