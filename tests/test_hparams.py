"""MEMoEHyperParams: the shipped files, validation with the key named, and the generated YAML reference."""
from pathlib import Path

import pytest
import yaml

from memoe_plugin import MEMoEHyperParams
from memoe_plugin.assets import hparams_path
from memoe_plugin.hparams_reference import reference_table

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(hparams_path("MEMoE").glob("*.yaml"))


def write(tmp_path, text, name="h.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = {"alg_name": "MEMoE", "model_name": "m", "layer": 3, "module_template": "model.layers.{}.mlp.down_proj"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_load(path):
    hp = MEMoEHyperParams.from_hparams(path)
    assert hp.alg_name == "MEMoE" and "{}" in hp.module_template
    # also without the suffix, as EasyEdit users write it
    assert MEMoEHyperParams.from_hparams(str(path)[:-5]) == hp


def test_paper_settings():
    gpt2xl = MEMoEHyperParams.from_hparams(REPO / "hparams/MEMoE/gpt2-xl-paper.yaml")
    llama = MEMoEHyperParams.from_hparams(REPO / "hparams/MEMoE/llama-7b-paper.yaml")
    assert (gpt2xl.layer, llama.layer) == (18, 16)
    for hp in (gpt2xl, llama):
        assert (hp.num_experts, hp.top_k, hp.lr) == (4, 1, 2e-4)
    assert gpt2xl.module_name == "transformer.h.18.mlp.c_proj"
    assert llama.module_name == "model.layers.16.mlp.down_proj"


def test_scientific_notation_strings_become_floats(tmp_path):
    path = write(tmp_path, yaml.safe_dump({**BASE, "lr": "1e-3", "aux_loss_weight": "2e-2"}))
    hp = MEMoEHyperParams.from_hparams(path)
    assert hp.lr == 1e-3 and isinstance(hp.lr, float) and hp.aux_loss_weight == 2e-2


@pytest.mark.parametrize("change, words", [
    ({"alg_name": "ROME"}, ["alg_name", "ROME"]),
    ({"bogus": 1}, ["unknown", "bogus"]),
    ({"num_experts": "four"}, ["num_experts", "int"]),
    ({"num_experts": 0}, ["num_experts", ">= 1"]),
    ({"top_k": 5}, ["top_k", "num_experts"]),
    ({"lr": -1.0}, ["lr", "> 0"]),
    ({"routing_input": "tokens"}, ["routing_input", "anchor"]),
    ({"anchor_backend": "spacy"}, ["anchor_backend", "offline"]),
    ({"module_template": "model.layers.mlp"}, ["module_template", "{}"]),
    ({"early_stop": "yes"}, ["early_stop", "bool"]),
    ({"layer": 2.5}, ["layer", "int"]),
    ({"gate_norm": "layer"}, ["gate_norm", "center"]),
    ({"gate_token_weight": -0.1}, ["gate_token_weight", ">= 0"]),
    ({"gate_lr_scale": -1}, ["gate_lr_scale", ">= 0"]),
    ({"memory_rows": -5}, ["memory_rows", ">= 0"]),
    ({"memory_batch": 0}, ["memory_batch", ">= 1"]),
    ({"scope_keys": True, "expert_routing": "key", "num_experts": 2, "top_k": 2}, ["top_k", "expert_routing: key"]),
])
def test_bad_values_name_the_key(tmp_path, change, words):
    path = write(tmp_path, yaml.safe_dump({**BASE, **change}))
    with pytest.raises(ValueError) as err:
        MEMoEHyperParams.from_hparams(path)
    for word in words:
        assert word in str(err.value)


def test_missing_keys(tmp_path):
    config = dict(BASE)
    del config["layer"]
    with pytest.raises(ValueError, match="missing required key.*layer"):
        MEMoEHyperParams.from_hparams(write(tmp_path, yaml.safe_dump(config)))
    del config["alg_name"]
    with pytest.raises(ValueError, match="alg_name"):
        MEMoEHyperParams.from_hparams(write(tmp_path, yaml.safe_dump(config)))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        MEMoEHyperParams.from_hparams(write(tmp_path, "alg_name: MEMoE\n  layer: [1,\n"))
    with pytest.raises(ValueError, match="mapping"):
        MEMoEHyperParams.from_hparams(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        MEMoEHyperParams.from_hparams(tmp_path / "nothere")


def test_every_field_has_help_and_the_readme_reference_is_generated_from_it():
    import dataclasses
    assert all(f.metadata.get("help") for f in dataclasses.fields(MEMoEHyperParams))
    table = reference_table()
    assert len(table.strip().splitlines()) == 2 + len(dataclasses.fields(MEMoEHyperParams))
    assert table in (REPO / "README.md").read_text(), "README's YAML reference is stale: paste reference_table()"


def test_the_repository_hparams_folder_is_the_shipped_one():
    assert (REPO / "hparams" / "MEMoE").resolve() == hparams_path("MEMoE").resolve()


def test_every_key_easyedit_reads_from_hparams_is_accepted_and_kept_as_given(tmp_path):
    """EasyEdit's editor and evaluate code read these from any hparams object (getattr/hasattr)."""
    from memoe_plugin import MEMoEHyperParams
    easyedit_keys = {"evaluation_type": "LLM-judge", "use_chat_template": True, "api_key": "sk-test",
                     "fp16": True, "quantization_bit": 4, "quant_type": "nf4", "double_quant": True,
                     "save_path": "out/", "model_parallel": False, "device": 0, "max_length": 30, "batch_size": 10}
    settings = yaml.safe_load((hparams_path("MEMoE") / "smollm2-135m.yaml").read_text())
    settings.update(easyedit_keys)
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(settings))
    hparams = MEMoEHyperParams.from_hparams(path)
    for key, value in easyedit_keys.items():
        assert getattr(hparams, key) == value, key
    settings.update(evaluation_type=None, api_key=None)          # unset: EasyEdit's teacher forcing
    path.write_text(yaml.safe_dump(settings))
    assert MEMoEHyperParams.from_hparams(path).evaluation_type is None
    settings["evaluation_type"] = "judge-by-vibes"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ValueError, match="evaluation_type.*generate-text"):
        MEMoEHyperParams.from_hparams(path)


def test_an_extensions_settings_may_be_written_as_a_section(tmp_path):
    section = {**BASE, "locality_guard": True, "scope": {"keys": True, "threshold": 0.3, "anti_keys": "relation_bank"},
               "memory": {"rows": 100, "weight": 5.0}}
    hp = MEMoEHyperParams.from_hparams(write(tmp_path, yaml.safe_dump(section)))
    assert (hp.scope_keys, hp.scope_threshold, hp.scope_anti_keys) == (True, 0.3, "relation_bank")
    assert (hp.memory_rows, hp.memory_weight) == (100, 5.0)
    flat = MEMoEHyperParams.from_dict({**BASE, "locality_guard": True, "scope_keys": True, "scope_threshold": 0.3,
                                       "scope_anti_keys": "relation_bank", "memory_rows": 100, "memory_weight": 5.0})
    assert flat == hp
    assert MEMoEHyperParams.from_dict({**BASE, "scope_keys": True, "scope.threshold": 0.2}).scope_threshold == 0.2
    with pytest.raises(ValueError, match="scope.treshold is not a setting of the 'scope' section.*threshold"):
        MEMoEHyperParams.from_dict({**BASE, "scope": {"treshold": 0.3}})
    with pytest.raises(ValueError, match="scope.keys is given twice"):
        MEMoEHyperParams.from_dict({**BASE, "scope": {"keys": True}, "scope_keys": True})


def test_choices_are_literal_types_and_dependencies_are_checked():
    import typing
    hints = typing.get_type_hints(MEMoEHyperParams)
    assert typing.get_args(hints["expert_routing"]) == ("gate", "key")
    with pytest.raises(ValueError, match=r"routing_input = 'tok'.*one of `anchor`, `sentence`, `token`"):
        MEMoEHyperParams.from_dict({**BASE, "routing_input": "tok"})
    with pytest.raises(ValueError, match="scope_positions.*locality_guard"):
        MEMoEHyperParams.from_dict({**BASE, "scope_keys": True, "scope_positions": "after_anchor"})
    with pytest.raises(ValueError, match="edits_per_expert.*expert_routing"):
        MEMoEHyperParams.from_dict({**BASE, "edits_per_expert": 10})
    for written, meant in (("chat: off", "off"), ("chat: on", "on"), ("chat: 'off'", "off"), ("chat: auto", "auto")):
        assert MEMoEHyperParams.from_dict({**BASE, **yaml.safe_load(written)}).chat == meant   # YAML 1.1: on/off
    with pytest.raises(ValueError, match="expert_routing = True.*one of `gate`, `key`"):
        MEMoEHyperParams.from_dict({**BASE, "expert_routing": True})     # a boolean only stands for on/off


def test_the_structural_settings_are_the_fields_marked_so():
    from memoe_plugin.hparams import structural_keys
    keys = structural_keys()
    assert {"layer", "module_template", "num_experts", "scope_keys", "scope_anti_keys", "expert_routing"} <= set(keys)
    assert not {"lr", "scale", "scope_threshold", "scope_snap", "model_name", "steps"} & set(keys)
