"""Every shipped hparams file for a model EasyEdit users edit works on that architecture.

Each file's module template is run through apply, generate and restore on a tiny random model of
the same architecture (same module names, few layers); the file's layer must sit at about
half-depth of the real model, as the paper chooses (its Figure 4).
"""
import pytest
import torch

from conftest import EDITS, REPO, assert_state_equal, state_copy
from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter

# file -> (transformers config class, model class, layers of the real model)
ARCHITECTURES = {
    "gpt2-xl": ("GPT2Config", "GPT2LMHeadModel", 48),
    "gpt-j-6b": ("GPTJConfig", "GPTJForCausalLM", 28),
    "llama-7b": ("LlamaConfig", "LlamaForCausalLM", 32),
    "llama3-8b": ("LlamaConfig", "LlamaForCausalLM", 32),
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", 28),
    "mistral-7b": ("MistralConfig", "MistralForCausalLM", 32),
}
TINY_LAYERS = 4


def tiny(config_name: str, model_name: str, vocab_size: int):
    import transformers
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(0)
    if config_name == "GPT2Config":
        config = config_cls(vocab_size=vocab_size, n_embd=32, n_layer=TINY_LAYERS, n_head=4, n_positions=128)
    elif config_name == "GPTJConfig":
        config = config_cls(vocab_size=vocab_size, n_embd=32, n_layer=TINY_LAYERS, n_head=4, n_positions=128,
                            rotary_dim=8)
    else:
        config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, tie_word_embeddings=False)
    return model_cls(config).eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shipped_file_runs_on_its_architecture(name, tokenizer):
    config_name, model_name, depth = ARCHITECTURES[name]
    hp = MEMoEHyperParams.from_hparams(REPO / "hparams" / "MEMoE" / f"{name}.yaml")
    assert 0.35 <= hp.layer / depth <= 0.55, f"{name}: layer {hp.layer} of {depth} is not about half-depth"
    assert hp.locality_guard is False and hp.replay == 0 and hp.memory_rows == 0   # the paper's method
    model = tiny(config_name, model_name, len(tokenizer))
    hp.layer, hp.device, hp.anchor_backend, hp.steps, hp.lr = TINY_LAYERS // 2, "cpu", "offline", 30, 5e-2
    saved = state_copy(model)
    inputs = tokenizer(EDITS[0]["prompt"], return_tensors="pt")
    before = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model, restore = apply_memoe_to_model(model, tokenizer, EDITS, hp)
    adapter = get_adapter(model)
    assert type(model.get_submodule(hp.module_name)).__name__ == "MoEBypass"
    assert adapter.last_report.target_accuracy > 0.5        # the edit trained through this architecture
    assert adapter.last_report.used_cached_activations      # and the fast path was exact on it
    after = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    target = tokenizer(EDITS[0]["prompt"] + " " + EDITS[0]["target_new"])["input_ids"][inputs["input_ids"].shape[1]]
    assert after[0, inputs["input_ids"].shape[1]].item() == target or not torch.equal(after, before)
    restore()
    assert get_adapter(model) is None
    assert_state_equal(model, saved)
    again = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(again, before)
