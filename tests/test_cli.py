"""memoe-edit: edit a local model directory with a shipped hparams file and show before/after."""
import pytest

from conftest import tiny_llama
from memoe_plugin import cli


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_edits_a_local_model_with_a_shipped_file(model_dir, capsys):
    settings = ["layer=2", "steps=30", "lr=0.05", "anchor_backend=offline"]
    assert cli.main(["--model", str(model_dir), "--hparams", "smollm2-135m", "--set", *settings,
                     "--limit", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "Editing 2 facts with MEMoE at model.layers.2.mlp.down_proj" in out
    assert "[1] The Eiffel Tower is located in the city of -> Rome" in out
    assert out.count("before:") == out.count("after:") == 6      # edit, rephrase, unrelated for each


def test_bad_settings_are_refused_with_the_key_named(model_dir, capsys):
    assert cli.main(["--model", str(model_dir), "--set", "num_experts=0"]) == 2
    assert "num_experts" in capsys.readouterr().err
    assert cli.main(["--model", str(model_dir), "--hparams", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert cli.main(["--model", str(model_dir), "--set", "layer"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_the_first_run_says_it_exports_the_model_and_later_runs_do_not(monkeypatch, capsys):
    """The quick start's first run waits about 20 s for the GGUF export: it says so, once."""
    from memoe_plugin.assets import gguf_export, models, smollm2
    monkeypatch.setattr(smollm2, "load_smollm2", lambda: ("model", "tokenizer"))
    for complete, said in ((False, True), (True, False)):
        monkeypatch.setattr(gguf_export, "is_complete_export", lambda path, complete=complete: complete)
        assert models.load_model(None) == ("model", "tokenizer")
        assert ("Exporting it once" in capsys.readouterr().out) is said
