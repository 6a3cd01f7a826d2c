"""memoe-compare, methods.py: the method registry (each method's needs as data), the shipped hparams, --set."""
from __future__ import annotations

import re

import pytest
import yaml

from memoe_plugin.assets import compare_hparams_dir
from memoe_plugin.eval import compare
from memoe_plugin.eval.compare import METHODS, CompareError, build_config, parse_overrides
from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)


def test_overrides_steps_alias_fixed_objective_and_paths(tmp_path):
    overrides = parse_overrides(["FT-L.steps=20", "wise.n_iter=5", "FT-L.lr=1e-3"], ["FT-L", "WISE"])
    assert overrides == {"FT-L": {"steps": 20, "lr": 1e-3}, "WISE": {"n_iter": 5}}
    with pytest.raises(CompareError, match="METHOD.key=value"):
        parse_overrides(["steps=3"], ["FT-L"])
    with pytest.raises(CompareError, match="not in --methods"):
        parse_overrides(["GRACE.n_iter=3"], ["FT-L"])
    path = compare_hparams_dir() / "FT-L.yaml"
    config = build_config("FT-L", path, {"steps": 20}, None)
    assert config["num_steps"] == 20 and config["objective_optimization"] == "prompt_last"
    assert not config["model_name"].startswith("~")
    assert build_config("FT-L", path, {}, str(tmp_path / "m-llama"))["model_name"] == str(tmp_path / "m-llama")
    with pytest.raises(CompareError, match="no key 'bogus'"):
        build_config("FT-L", path, {"bogus": 1}, None)
    with pytest.raises(CompareError, match="prompt_last"):
        build_config("FT-L", path, {"objective_optimization": "target_new"}, None)
    with pytest.raises(CompareError, match="alg_name"):
        build_config("FT-L", compare_hparams_dir() / "GRACE.yaml", {}, None)


@pytest.mark.parametrize("protocol", ["batch", "sequential"])
@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if not s.unavailable])
def test_shipped_hparams_fit_smollm2(method, protocol):
    path = compare.hparams_path_for(method, None, {}, protocol)
    config = yaml.safe_load(path.read_text())
    assert config["alg_name"] == METHODS[method].alg_name
    assert str(config["device"]) == "cpu" and "smollm2-135m-llama" in config["model_name"]
    for key, value in METHODS[method].fixed:
        assert config[key] == value
    layers = list(config.get("layers", [])) + [config[k] for k in ("layer", "v_loss_layer") if k in config]
    layers += [int(n) for p in config.get("inner_params", []) for n in re.findall(r"layers[.\[](\d+)", p)]
    assert all(0 <= layer < 30 for layer in layers), layers


@pytest.mark.parametrize("method", ["FT-M", "LoRA", "UltraEdit"])
def test_the_gemma_files_are_the_smollm2_files_at_the_same_relative_depth(method):
    gemma = yaml.safe_load((compare_hparams_dir("gemma3-270m") / f"{method}.yaml").read_text())
    smol = yaml.safe_load((compare_hparams_dir("smollm2-135m") / f"{method}.yaml").read_text())
    assert gemma["alg_name"] == METHODS[method].alg_name and "gemma3-270m" in gemma["model_name"]
    assert "llama" in gemma["model_name"]          # EasyEdit picks its loader by words in the path

    def layers(config):
        found = list(config.get("layers", []))
        return found + [int(n) for p in config.get("inner_params", []) for n in re.findall(r"layers[.\[](\d+)", p)]
    assert sorted(set(layers(gemma))) == sorted({layer * 18 // 30 for layer in layers(smol)})
    assert {k: v for k, v in gemma.items() if k not in ("model_name", "tokenizer_name", "layers", "inner_params")} \
        == {k: v for k, v in smol.items() if k not in ("model_name", "tokenizer_name", "layers", "inner_params")}
    for key, value in METHODS[method].fixed:
        assert gemma[key] == value


def test_each_methods_needs_are_data_on_its_spec_and_the_backend_names_no_method():
    """The backend reads MethodSpec fields; a new method is one registry entry, not a switch in the backend."""
    import inspect
    import re
    from memoe_plugin.eval.compare import easyedit_backend, protocol
    for module in (easyedit_backend, protocol):
        source = inspect.getsource(module)
        named = {m for m in re.findall(r'[=!]= ?"([A-Za-z-]+)"', source) if m in METHODS or
                 m in {spec.alg_name for spec in METHODS.values()}}
        assert not named, (module.__name__, named)
    assert METHODS["MEMoE"].checkpointable and METHODS["MEMoE"].own_hparams
    assert METHODS["AlphaEdit"].reset_before_run and METHODS["UltraEdit"].chunk_is_batch
    assert {n for n, s in METHODS.items() if s.statistics} == {"ROME", "MEMIT", "EMMET", "AlphaEdit", "PMET",
                                                                "R-ROME"}
