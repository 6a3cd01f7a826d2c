"""save_adapter / load_adapter: one safetensors file, identical logits, clear refusals, exact restore."""
import ast
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import (EDITS, GPT2_TEMPLATE, assert_state_equal, interrupted_and_straight, make_hparams, rewrite,
                      state_copy, tiny_gpt2, tiny_llama)
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.persist import FORMAT_VERSION, load_adapter, read_adapter_metadata, save_adapter

TEXTS = ["The mother tongue of Danielle Darrieux is", "The capital of Japan is Tokyo",
         "Toko Yasuda plays the guitar", "Who is the father of Marie Curie?"]

ARCHS = {
    "llama": (tiny_llama, lambda **kw: make_hparams(steps=10, **kw)),
    "gpt2": (tiny_gpt2, lambda **kw: make_hparams(GPT2_TEMPLATE, model_name="tiny-gpt2", steps=10, **kw)),
}


def logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny Llama edited with all EDITS, saved; returns (path, logits of the edited model)."""
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=10))
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(model, path)
    return path, logits(model, tokenizer)


def assert_untouched(model, state):
    assert get_adapter(model) is None
    assert_state_equal(model, state)
    assert not model._forward_pre_hooks and not model._forward_hooks and "generate" not in model.__dict__


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_adapter_gives_identical_logits(arch, tokenizer, tmp_path):
    make_model, hparams = ARCHS[arch]
    edited = make_model(len(tokenizer))
    apply_memoe_to_model(edited, tokenizer, EDITS, hparams())
    assert get_adapter(edited).bypass.experts.abs().sum() > 0
    expected = logits(edited, tokenizer)
    path = save_adapter(edited, tmp_path / "a.safetensors")

    fresh = make_model(len(tokenizer))   # same seed: the same base weights
    original = state_copy(fresh)
    assert not torch.equal(logits(fresh, tokenizer), expected)
    adapter = load_adapter(fresh, tokenizer, path)
    assert get_adapter(fresh) is adapter and adapter.edits == get_adapter(edited).edits
    assert torch.equal(logits(fresh, tokenizer), expected)
    ids = tokenizer(TEXTS[0], return_tensors="pt")
    assert torch.equal(fresh.generate(**ids, max_new_tokens=4, do_sample=False),
                       edited.generate(**ids, max_new_tokens=4, do_sample=False))
    assert all(not p.requires_grad for p in adapter.bypass.trainable_parameters)
    remove_memoe(fresh)
    assert_untouched(fresh, original)


@pytest.mark.parametrize("routing_input", ["anchor", "token"])
def test_locality_guard_and_replay_round_trip(routing_input, tokenizer, tmp_path):
    """With the locality guard on, its keys travel with the file: same logits, also off-topic."""
    hp = make_hparams(steps=10, locality_guard=True, replay=2, routing_input=routing_input)
    edited = tiny_llama(len(tokenizer))
    apply_memoe_to_model(edited, tokenizer, EDITS[:2], hp)
    apply_memoe_to_model(edited, tokenizer, EDITS[2:], hp)
    texts = TEXTS + ["the a of in is was by to and", "Apple A5 is developed by"]
    expected = logits(edited, tokenizer, texts)
    path = save_adapter(edited, tmp_path / "g.safetensors")
    assert read_adapter_metadata(path)["anchors"]["locality_guard_keys"] == sorted(get_adapter(edited).guard.keys)
    fresh = tiny_llama(len(tokenizer))
    original = state_copy(fresh)
    adapter = load_adapter(fresh, tokenizer, path)
    assert adapter.guard.keys == get_adapter(edited).guard.keys
    assert torch.equal(logits(fresh, tokenizer, texts), expected)
    apply_memoe_to_model(fresh, tokenizer, [{"prompt": "Marie Curie was born in", "target_new": "Tokyo"}], hp)
    assert "marie curie" in adapter.guard.keys and len(adapter.edits) == len(EDITS) + 1
    remove_memoe(fresh)
    assert_untouched(fresh, original)


def test_file_is_one_safetensors_file_with_json_metadata(saved, tmp_path):
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.safetensors"]   # no temp files left
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])          # the safetensors header is plain JSON
    assert set(header) == {"__metadata__", "experts", "gate.weight", "gate_shift", "gate_scale"}
    assert header["experts"]["dtype"] == "F32"
    document = read_adapter_metadata(path)
    assert document["format_version"] == FORMAT_VERSION
    assert document["hparams"]["layer"] == 2 and document["module"]["name"] == "model.layers.2.mlp.down_proj"
    assert [(e["prompt"], e["target_new"]) for e in document["edits"]] == [(e["prompt"], e["target_new"])
                                                                           for e in EDITS]
    assert document["tensors"]["experts"]["shape"] == [4, 64, 32]
    assert document["anchors"]["extractor"] == "offline"
    import memoe_plugin
    assert document["memoe_plugin_version"] == memoe_plugin.__version__
    assert len(document["model"]["config_sha256"]) == 64 and document["model"]["model_type"] == "llama"
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:8]   # not a pickle / torch zip


def test_no_pickle_in_the_module():
    """The persist package imports no pickle module and calls neither torch.save nor torch.load."""
    folder = Path(__file__).resolve().parents[1].joinpath("memoe_plugin", "persist")
    for source in sorted(folder.glob("*.py")):
        _assert_no_pickle(ast.parse(source.read_text()))


def _assert_no_pickle(tree):
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "joblib"}
    calls = {f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    assert not calls & {"torch.save", "torch.load"}


def test_sequential_edits_after_load_reuse_it_and_restore_is_exact(saved, tokenizer):
    path, _ = saved
    model = tiny_llama(len(tokenizer))
    original = state_copy(model)
    adapter = load_adapter(model, tokenizer, path)
    new_edit = {"prompt": "Marie Curie was born in", "target_new": "Tokyo"}
    _, restore = apply_memoe_to_model(model, tokenizer, [new_edit], make_hparams(steps=40))
    assert get_adapter(model) is adapter and len(adapter.edits) == len(EDITS) + 1
    full = tokenizer(new_edit["prompt"] + " " + new_edit["target_new"], return_tensors="pt")
    prompt_len = len(tokenizer(new_edit["prompt"])["input_ids"])
    with torch.no_grad():
        predicted = model(**full).logits[0].argmax(-1)[prompt_len - 1:-1].tolist()
    assert predicted == full["input_ids"][0, prompt_len:].tolist()
    restore()
    assert_untouched(model, original)


def test_resave_after_more_edits_keeps_all_edits(saved, tokenizer, tmp_path):
    path, _ = saved
    model = tiny_llama(len(tokenizer))
    load_adapter(model, tokenizer, path)
    apply_memoe_to_model(model, tokenizer, [{"prompt": "Marie Curie was born in", "target_new": "Tokyo"}],
                         make_hparams(steps=5))
    expected = logits(model, tokenizer)
    second = save_adapter(model, tmp_path / "b.safetensors")
    assert len(read_adapter_metadata(second)["edits"]) == len(EDITS) + 1
    other = tiny_llama(len(tokenizer))
    load_adapter(other, tokenizer, second)
    assert torch.equal(logits(other, tokenizer), expected)


def test_bfloat16_model_loads_a_float32_saved_adapter(saved, tokenizer):
    path, expected = saved
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    original = state_copy(model)
    adapter = load_adapter(model, tokenizer, path)   # weight checksum skipped: other dtype
    assert adapter.bypass.experts.dtype == torch.float32
    out = logits(model, tokenizer).float()
    assert torch.isfinite(out).all()
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    remove_memoe(model)
    assert_untouched(model, original)


# ------------------------------------------------------------------ atomic writes
def test_save_is_atomic(saved, tokenizer, tmp_path, monkeypatch):
    import safetensors.torch
    path, _ = saved
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(steps=2))

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    monkeypatch.undo()
    save_adapter(model, target)   # overwriting works and leaves no temp file
    assert [e["prompt"] for e in read_adapter_metadata(target)["edits"]] == [EDITS[0]["prompt"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_save_without_adapter_or_to_a_directory_is_refused(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="no MEMoE adapter to save"):
        save_adapter(model, tmp_path / "x.safetensors")
    apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(steps=1))
    with pytest.raises(ValueError, match="is a directory"):
        save_adapter(model, tmp_path)
    remove_memoe(model)


# ------------------------------------------------------------------ refusals
def _other_tokenizer(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token>"])
    return other


def _wider_llama(vocab_size):
    from transformers import LlamaForCausalLM
    config = tiny_llama(vocab_size).config
    config.intermediate_size = 48
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _bump_version(metadata):
    metadata["format_version"] = str(FORMAT_VERSION + 1)


def _wrong_layer(document):
    document["hparams"]["layer"] = 9
    document["module"]["layer"], document["module"]["name"] = 9, "model.layers.9.mlp.down_proj"


def _two_experts(tensors, document):
    tensors["experts"] = tensors["experts"][:2].contiguous()
    from memoe_plugin.persist.identity import tensor_sha256 as _tensor_sha256
    document["tensors"]["experts"] = {"shape": [2, 64, 32], "dtype": "float32",
                                      "sha256": _tensor_sha256(tensors["experts"])}


def _write(path, data):
    path.write_bytes(data)
    return path


def _flip_bit(src, dst):
    raw = bytearray(src.read_bytes())
    raw[-5] ^= 0x10   # inside the tensor data
    dst.write_bytes(bytes(raw))
    return dst


REFUSALS = {
    "missing file": (lambda src, d: d / "nothing.safetensors", None, "no MEMoE adapter file"),
    "directory": (lambda src, d: d, None, "is a directory"),
    "garbage bytes": (lambda src, d: _write(d / "g.safetensors", os.urandom(200)),
                      None, "not a readable safetensors file"),
    "truncated": (lambda src, d: _write(d / "t.safetensors", src.read_bytes()[:-100]), None, "corrupt or truncated"),
    "empty file": (lambda src, d: _write(d / "0.safetensors", b""), None, "corrupt or truncated"),
    "bit flip": (lambda src, d: _flip_bit(src, d / "f.safetensors"), None, "checksum"),
    "plain safetensors": (lambda src, d: rewrite(src, d / "p.safetensors",
                                                 change_metadata=lambda m: m.update(format="other")),
                          None, "not a MEMoE adapter"),
    "damaged json": (lambda src, d: rewrite(src, d / "j.safetensors",
                                            change_metadata=lambda m: m.update(memoe="{not json")),
                     None, "JSON metadata is missing or damaged"),
    "newer format": (lambda src, d: rewrite(src, d / "n.safetensors", change_metadata=_bump_version),
                     None, "newer.*upgrade memoe_plugin"),
    "another model": (None, lambda tok: _wider_llama(len(tok)), "another model.*intermediate_size: saved 64, here 48"),
    "another architecture": (None, lambda tok: tiny_gpt2(len(tok)), "another model.*gpt2"),
    "other weights": (None, lambda tok: tiny_llama(len(tok), seed=1), "other weights"),
    "another layer": (lambda src, d: rewrite(src, d / "l.safetensors", change_document=_wrong_layer),
                      None, "layer 9.*out of range"),
    "other shapes": (lambda src, d: rewrite(src, d / "s.safetensors", change_tensors=_two_experts),
                     None, r"shape \[2, 64, 32\].*needs \[4, 64, 32\]"),
    "other extractor": (lambda src, d: rewrite(src, d / "e.safetensors",
                                               change_document=lambda doc: doc["anchors"].update(extractor="nltk")),
                        None, "'nltk' entity extractor.*nltk.downloader"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_mismatches_are_refused_and_leave_the_model_alone(case, saved, tokenizer, tmp_path):
    make_path, make_model, words = REFUSALS[case]
    path = make_path(saved[0], tmp_path) if make_path else saved[0]
    model = make_model(tokenizer) if make_model else tiny_llama(len(tokenizer))
    state = state_copy(model)
    with pytest.raises(ValueError, match=words):
        load_adapter(model, tokenizer, path)
    assert_untouched(model, state)


def test_other_tokenizer_is_refused(saved, tokenizer):
    model = tiny_llama(len(tokenizer))
    state = state_copy(model)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_adapter(model, _other_tokenizer(tokenizer), saved[0])
    assert_untouched(model, state)


def test_model_with_an_adapter_is_refused(saved, tokenizer):
    model = tiny_llama(len(tokenizer))
    state = state_copy(model)
    adapter = load_adapter(model, tokenizer, saved[0])
    experts = adapter.bypass.experts.detach().clone()
    with pytest.raises(ValueError, match="already has a MEMoE adapter"):
        load_adapter(model, tokenizer, saved[0])
    assert get_adapter(model) is adapter and torch.equal(adapter.bypass.experts, experts)
    remove_memoe(model)
    assert_untouched(model, state)


def test_wrong_device_is_refused(saved, tokenizer):
    model = tiny_llama(len(tokenizer))
    state = state_copy(model)
    with pytest.raises(ValueError, match="must sit on its layer's device"):
        load_adapter(model, tokenizer, saved[0], device="meta")
    with pytest.raises(ValueError, match="not a torch device"):
        load_adapter(model, tokenizer, saved[0], device="gpu7")
    assert_untouched(model, state)
    adapter = load_adapter(model, tokenizer, saved[0], device="cpu")
    assert adapter.hparams.device == "cpu"
    remove_memoe(model)


# ------------------------------------------------------------ gate normalisation
def test_centred_gate_statistics_round_trip_and_stay_fixed(tokenizer, tmp_path):
    """gate_norm: center calibrates once, on the first edits; the file carries the statistics."""
    hp = make_hparams(steps=10, gate_norm="center", gate_token_weight=0.5)
    edited = tiny_llama(len(tokenizer))
    apply_memoe_to_model(edited, tokenizer, EDITS[:2], hp)
    bypass = get_adapter(edited).bypass
    shift, scale = bypass.gate_shift.clone(), bypass.gate_scale.clone()
    assert shift.abs().sum() > 0 and not torch.equal(scale, torch.ones_like(scale))
    apply_memoe_to_model(edited, tokenizer, EDITS[2:], hp)          # a later edit does not recalibrate
    assert torch.equal(bypass.gate_shift, shift) and torch.equal(bypass.gate_scale, scale)
    expected = logits(edited, tokenizer)
    path = save_adapter(edited, tmp_path / "c.safetensors")
    fresh = tiny_llama(len(tokenizer))
    adapter = load_adapter(fresh, tokenizer, path)
    assert torch.equal(adapter.bypass.gate_shift, shift) and torch.equal(adapter.bypass.gate_scale, scale)
    assert torch.equal(logits(fresh, tokenizer), expected)
    apply_memoe_to_model(fresh, tokenizer, EDITS[:1], hp)             # nor does one after a load
    assert torch.equal(adapter.bypass.gate_shift, shift)
    remove_memoe(fresh)


def test_version_1_file_without_gate_statistics_still_loads(saved, tokenizer, tmp_path):
    path, expected = saved
    def as_version_1(tensors, document):
        for name in ("gate_shift", "gate_scale"):
            del tensors[name]
            del document["tensors"][name]
    old = rewrite(path, tmp_path / "v1.safetensors", change_tensors=as_version_1,
                  change_metadata=lambda metadata: metadata.update(format_version="1"))
    fresh = tiny_llama(len(tokenizer))
    adapter = load_adapter(fresh, tokenizer, old)
    assert torch.equal(adapter.bypass.gate_shift, torch.zeros_like(adapter.bypass.gate_shift))
    assert torch.equal(logits(fresh, tokenizer), expected)
    remove_memoe(fresh)


STATEFUL = dict(steps=30, locality_guard=True, scope_keys=True, scope_threshold=0.3, expert_routing="key",
                edits_per_expert=2, num_experts=1, memory_rows=40, memory_weight=5.0, replay=1)
CALLS = [EDITS[:2], EDITS[2:] + [{"prompt": "Marie Curie was born in", "target_new": "Tokyo",
                                  "subject": "Marie Curie"}],
         [{"prompt": "Watts Humphrey attended", "target_new": "Paris", "subject": "Watts Humphrey"}]]


@pytest.mark.parametrize("snap", [0.0, 0.5])
def test_a_saved_adapter_keeps_editing_exactly_as_if_never_saved(snap, tokenizer, tmp_path):
    """Keys (and, with scope_snap, their inputs), key routing with grown experts, guard owners and the
    output memory all come back, so a run interrupted after its second call and resumed from the file
    ends bit for bit where an uninterrupted run ends."""
    hp = make_hparams(**STATEFUL, scope_snap=snap)
    straight, resumed, path = interrupted_and_straight(tokenizer, hp, CALLS, tmp_path / "checkpoint.safetensors")
    meta = read_adapter_metadata(path)
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert {"scope.keys", "scope.edit_ids", "expert_of", "memory.x", "memory.delta"} <= set(meta["tensors"])
    assert ("scope.inputs" in meta["tensors"]) == (snap > 0)
    probe = tokenizer(["Watts Humphrey attended", "Toko Yasuda plays the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(straight(**probe).logits, resumed(**probe).logits)
    remove_memoe(straight)
    remove_memoe(resumed)


def test_snapping_scope_refuses_a_file_saved_without_key_inputs(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:2], make_hparams(**STATEFUL))
    path = save_adapter(model, tmp_path / "plain.safetensors")
    assert "scope.inputs" not in read_adapter_metadata(path)["tensors"]
    rewrite(path, tmp_path / "snap.safetensors",
            change_document=lambda document: document["hparams"].update(scope_snap=0.5))
    target = tiny_llama(len(tokenizer))
    state = state_copy(target)
    with pytest.raises(ValueError, match="scope_snap"):
        load_adapter(target, tokenizer, tmp_path / "snap.safetensors")
    assert_untouched(target, state)
