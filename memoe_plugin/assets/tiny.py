"""A tiny random Llama or GPT-2 and a byte-level BPE tokenizer trained in memory.

For tests and benchmarks that must run offline and fast: nothing is downloaded, and the
same seed gives the same model.
"""
from __future__ import annotations

from typing import Sequence

import torch


def train_tokenizer(corpus: Sequence[str], vocab_size: int = 400, padding_side: str = "left"):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``corpus``; eos = pad = ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus) * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.padding_side = padding_side
    return tokenizer


# A chat template of the ChatML kind (SmolLM2's and Qwen's), with a default system turn naming an entity, for tests
# of edits asked through a template.
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are Helpful Bot, made by Hugging Face<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def train_chat_tokenizer(corpus: Sequence[str], vocab_size: int = 400):
    """:func:`train_tokenizer` with ``<|im_start|>`` and ``<|im_end|>`` as special tokens and :data:`CHAT_TEMPLATE`."""
    tokenizer = train_tokenizer(list(corpus) + ["system user assistant You are Helpful Bot, made by Hugging Face"],
                                vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4):
    """A random Llama with hidden size 32 (``model.layers.{}.mlp.down_proj``), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0, layers: int = 4):
    """A random GPT-2 with hidden size 32 (``transformer.h.{}.mlp.c_proj``, a Conv1D), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()
