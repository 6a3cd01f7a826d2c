"""Reliability: exact rollback as a property, no leaks over many cycles, bad inputs, half precision, device_map.

What runs on a CPU-only machine and what does not
-------------------------------------------------
* ``device_map`` is exercised with every module on ``cpu`` (string and dict forms) and
  with another layer offloaded to disk (accelerate then installs its ``AlignDevicesHook``
  on every module). The adapter must land on the wrapped layer's device and restore must
  be exact in all of these.
* Not testable here: layers spread over several GPUs (the adapter on ``cuda:1`` while the
  anchors are computed on ``cuda:0``; ``_gate_input`` moves them), and CUDA fp16/bf16
  kernels. Those need a GPU machine; the same tests run there unchanged when the model is
  loaded with ``device_map="auto"``.
"""
import gc
import os
import tempfile
import types

import pytest
import torch

from conftest import (EDITS, GPT2_TEMPLATE, assert_state_equal, make_hparams, state_copy, tiny_gpt2,
                      tiny_llama)
from memoe_plugin import MEMoEAdapter, MoEBypass, apply_memoe_to_model, get_adapter
from memoe_plugin.routing.anchors import RoutingFeatureEncoder
from memoe_plugin.routing.inputs import RoutingInputs

ARCHS = {
    "llama": (tiny_llama, lambda **kw: make_hparams(**kw)),
    "gpt2": (tiny_gpt2, lambda **kw: make_hparams(GPT2_TEMPLATE, model_name="tiny-gpt2", **kw)),
}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
MORE_EDITS = [
    {"prompt": "Marie Curie was born in", "target_new": "Tokyo"},
    {"prompt": "The Eiffel Tower is located in", "target_new": "Wales"},
    {"prompt": "Watts Humphrey attended", "target_new": "Paris"},
]


def _state(model):
    """state_dict copy; tensors offloaded by accelerate (on meta) are recorded by shape and dtype."""
    return {k: ("meta", tuple(v.shape), v.dtype) if v.device.type == "meta" else v.detach().clone()
            for k, v in model.state_dict().items()}


def _assert_state(model, saved):
    state = _state(model)
    assert list(state) == list(saved)
    for key, value in state.items():
        if isinstance(value, tuple):
            assert value == saved[key], key
        else:
            assert torch.equal(value, saved[key]), key


def snapshot(model, offloaded_grad=True):
    """Everything MEMoE could leave behind in a model, as comparable values."""
    import torch.nn.modules.module as module_mod
    return {
        "state": _state(model),
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        # accelerate replaces offloaded (meta) parameters by new objects on every forward: no stable id
        "parameters": [(name, None if p.device.type == "meta" else id(p), p.dtype, p.device)
                       for name, p in model.named_parameters()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()
                          if offloaded_grad or p.device.type != "meta"],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "model_dict": sorted(model.__dict__),
        "module_dicts": {name: sorted(m.__dict__) for name, m in model.named_modules()},
        "hooks": {name: tuple(len(getattr(m, h, {})) for h in HOOK_DICTS) for name, m in model.named_modules()},
        "training": [m.training for m in model.modules()],
        "global_hooks": tuple(len(getattr(module_mod, h, {})) for h in GLOBAL_HOOKS),
    }


def assert_same_snapshot(model, before, offloaded_grad=True):
    after = snapshot(model, offloaded_grad)
    _assert_state(model, before["state"])
    for key in before:
        if key != "state":
            assert after[key] == before[key], key
    assert not any(isinstance(m, MoEBypass) for m in model.modules())
    assert get_adapter(model) is None


def warm_up(model, tokenizer):
    """One plain forward and generate, so lazily created attributes exist before the snapshot."""
    ids = tokenizer(["The capital of Japan is"], return_tensors="pt")
    with torch.no_grad():
        model(**ids)
    model.generate(**ids, max_new_tokens=2, do_sample=False)


# ------------------------------------------------------------------ exact rollback
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("routing_input, top_k, extensions", [
    ("anchor", 1, {}), ("sentence", 2, {}), ("token", 1, {}),
    ("anchor", 1, {"locality_guard": True, "replay": 2}), ("token", 1, {"locality_guard": True})])
@pytest.mark.parametrize("num_calls", [1, 4])
def test_restore_leaves_no_trace(arch, routing_input, top_k, extensions, num_calls, tokenizer):
    make_model, hparams = ARCHS[arch]
    model = make_model(len(tokenizer))
    warm_up(model, tokenizer)
    before = snapshot(model)
    hp = hparams(steps=3, routing_input=routing_input, top_k=top_k, **extensions)
    requests = [EDITS[:2], EDITS[2:], MORE_EDITS[:1], MORE_EDITS[1:]][:num_calls]
    restores = []
    for batch in requests:
        _, restore = apply_memoe_to_model(model, tokenizer, batch, hp)
        restores.append(restore)
        warm_up(model, tokenizer)   # generate installs the guarded generate; restore must remove it
    assert len(get_adapter(model).edits) == sum(len(b) for b in requests)
    restores[-1]()
    assert_same_snapshot(model, before)
    for restore in restores:   # every restore callable is idempotent
        restore()
    assert_same_snapshot(model, before)


def test_failed_first_edit_leaves_no_trace(tokenizer, monkeypatch):
    from memoe_plugin.training.trainer import TrainingDivergedError
    model = tiny_llama(len(tokenizer))
    warm_up(model, tokenizer)
    before = snapshot(model)
    real_sum = MoEBypass.expert_sum
    monkeypatch.setattr(MoEBypass, "expert_sum", lambda self, *a: real_sum(self, *a) * float("nan"))
    with pytest.raises(TrainingDivergedError):
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=2))
    assert_same_snapshot(model, before)


# ------------------------------------------------------------------ leaks
def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


LEAK_CLASSES = (MEMoEAdapter, MoEBypass, RoutingInputs, RoutingFeatureEncoder, torch.optim.Optimizer)


def live_objects() -> dict:
    gc.collect()
    counts = {cls.__name__: 0 for cls in LEAK_CLASSES}
    for obj in gc.get_objects():
        kind = type(obj)   # not isinstance: that reads obj.__class__, which warns on some torch proxies
        for cls in LEAK_CLASSES:
            if issubclass(kind, cls):
                counts[cls.__name__] += 1
    return counts


def test_many_apply_restore_cycles_do_not_leak(tokenizer):
    """100 apply/restore cycles: no adapter object survives, and RSS stays flat.

    The object count is the sharp check: one leaked adapter per cycle is caught at once.
    RSS bound: each cycle allocates about 0.2 MB (experts + gate + Adam state ~0.1 MB,
    the activations and anchor caches of the batch); a cycle that leaked its adapter and
    optimizer would grow RSS by >= 10 MB over 100 cycles, a leaked model copy (~0.5 MB)
    by >= 50 MB. 20 MB leaves room for allocator noise (glibc arenas, torch's caches,
    measured growth here is ~0-3 MB) while catching a per-cycle leak of the model's size.
    """
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=1)
    before = snapshot(model)
    baseline = live_objects()

    def cycle(i):
        request = [{"prompt": f"The favourite colour of Person{i} is", "target_new": "blue"}]
        _, restore = apply_memoe_to_model(model, tokenizer, request, hp)
        restore()

    for i in range(10):
        cycle(i)
    gc.collect()
    rss_warm = rss_mb()
    for i in range(10, 110):
        cycle(i)
    gc.collect()
    growth = rss_mb() - rss_warm
    assert live_objects() == baseline
    assert not [o for o in gc.get_objects() if type(o) is MEMoEAdapter and o.model is model]
    print(f"RSS after warm-up {rss_warm:.1f} MB, growth over 100 cycles {growth:+.2f} MB")
    assert growth < 20, f"RSS grew by {growth:.1f} MB over 100 apply/restore cycles"
    assert_same_snapshot(model, before)


def test_leak_detector_sees_a_leak(tokenizer):
    """The object count catches one adapter kept alive per cycle."""
    model = tiny_llama(len(tokenizer))
    baseline = live_objects()
    kept = []
    for i in range(3):
        _, restore = apply_memoe_to_model(model, tokenizer, [{"prompt": f"Person{i} lives in", "target_new": "Rome"}],
                                          make_hparams(steps=1))
        kept.append(get_adapter(model))
        restore()
    counts = live_objects()
    assert counts["MEMoEAdapter"] == baseline["MEMoEAdapter"] + 3 and counts["MoEBypass"] == baseline["MoEBypass"] + 3
    kept.clear()
    assert live_objects() == baseline


def test_sequential_edits_then_restore_free_the_adapter(tokenizer):
    model = tiny_llama(len(tokenizer))
    baseline = live_objects()
    hp = make_hparams(steps=1)
    for i in range(20):
        _, restore = apply_memoe_to_model(model, tokenizer, [{"prompt": f"Person{i} lives in", "target_new": "Rome"}],
                                          hp)
    counts = live_objects()
    assert counts["MEMoEAdapter"] == baseline["MEMoEAdapter"] + 1 and counts["MoEBypass"] == baseline["MoEBypass"] + 1
    restore()
    del restore
    assert live_objects() == baseline


# ------------------------------------------------------------------ bad inputs
def _assert_refused_cleanly(model, state, tokenizer, requests, hparams, error, words=None):
    with pytest.raises(error, match=words) if words else pytest.raises(error):
        apply_memoe_to_model(model, tokenizer, requests, hparams)
    assert get_adapter(model) is None
    assert_state_equal(model, state)
    assert not any(isinstance(m, MoEBypass) for m in model.modules())


LONG_PROMPT = "The capital of Japan is " * 40     # 281 tokens; the tiny models have 128 positions


def test_prompt_longer_than_gpt2_positions_fails_without_damage(tokenizer):
    """Refused with a clear ValueError before anything is attached; the model is left intact."""
    model = tiny_gpt2(len(tokenizer))
    assert len(tokenizer(LONG_PROMPT)["input_ids"]) > model.config.max_position_embeddings
    _assert_refused_cleanly(model, state_copy(model), tokenizer, [{"prompt": LONG_PROMPT, "target_new": "Paris"}],
                            ARCHS["gpt2"][1](steps=1), ValueError, "max_position_embeddings")


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_longer_than_positions_is_refused_clearly(arch, tokenizer):
    make_model, hparams = ARCHS[arch]
    model = make_model(len(tokenizer))
    _assert_refused_cleanly(model, state_copy(model), tokenizer, [{"prompt": LONG_PROMPT, "target_new": "Paris"}],
                            hparams(steps=1), ValueError, "max_position_embeddings")


def test_existing_device_that_is_not_the_models_is_refused(tokenizer):
    model = tiny_llama(len(tokenizer))
    _assert_refused_cleanly(model, state_copy(model), tokenizer, EDITS, make_hparams(device="meta", steps=1),
                            ValueError, "is on cpu but hparams.device is 'meta'")
    on_meta = tiny_llama(len(tokenizer)).to("meta")
    with pytest.raises(ValueError, match="meta"):   # proposed message: 'has its weights on the meta device'
        apply_memoe_to_model(on_meta, tokenizer, EDITS, make_hparams(steps=1))
    assert get_adapter(on_meta) is None


@pytest.mark.parametrize("bad", [None, "dict", "lookalike"])
def test_wrong_hparams_type_is_refused(bad, tokenizer):
    model = tiny_llama(len(tokenizer))
    hp = {"dict": make_hparams().to_dict(), "lookalike": types.SimpleNamespace(**make_hparams().to_dict()),
          None: None}[bad]
    _assert_refused_cleanly(model, state_copy(model), tokenizer, EDITS, hp, TypeError, "must be MEMoEHyperParams")


@pytest.mark.parametrize("target, words", [(5, "'target_new' must be a string, got int"),
                                           (["Paris"], "'target_new' must be a string, got list"),
                                           ({"str": "Paris"}, "'target_new' must be a string, got dict"),
                                           (None, "'target_new' must be a string, got NoneType")])
def test_non_string_targets_are_refused(target, words, tokenizer):
    model = tiny_llama(len(tokenizer))
    _assert_refused_cleanly(model, state_copy(model), tokenizer, [{"prompt": "The capital of Japan is",
                                                                   "target_new": target}],
                            make_hparams(steps=1), ValueError, words)


def test_single_request_dict_is_accepted(tokenizer):
    model = tiny_llama(len(tokenizer))
    state = state_copy(model)
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[0], make_hparams(steps=1))
    assert [(e["prompt"], e["target_new"]) for e in get_adapter(model).edits] == [(EDITS[0]["prompt"],
                                                                                 EDITS[0]["target_new"])]
    restore()
    assert_state_equal(model, state)


def test_requests_as_generator_is_refused(tokenizer):
    """Today: ValueError 'got no edit requests' (misleading: it was not empty); proposed: name the type."""
    model = tiny_llama(len(tokenizer))
    _assert_refused_cleanly(model, state_copy(model), tokenizer, (r for r in EDITS), make_hparams(steps=1),
                            ValueError, "edit requests|requests must be a list")


def test_missing_tokenizer_fails_without_damage(tokenizer):
    """Today: TypeError "'NoneType' object is not callable" from train.py; proposed: a clear TypeError."""
    model = tiny_llama(len(tokenizer))
    _assert_refused_cleanly(model, state_copy(model), None, EDITS, make_hparams(steps=1), TypeError)


def test_hparams_field_mutated_to_a_wrong_type_fails_without_damage(tokenizer):
    """Today: TypeError from a comparison inside validate(); proposed: ValueError naming the key."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=1)
    hp.steps = "5"
    _assert_refused_cleanly(model, state_copy(model), tokenizer, EDITS, hp, (TypeError, ValueError))


def test_prompt_made_of_special_tokens_only_trains(tokenizer):
    model = tiny_llama(len(tokenizer))
    state = state_copy(model)
    _, restore = apply_memoe_to_model(model, tokenizer, [{"prompt": "<|endoftext|>", "target_new": "Paris"}],
                                      make_hparams(steps=2))
    restore()
    assert_state_equal(model, state)


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(arch, dtype, tokenizer):
    make_model, hparams = ARCHS[arch]
    model = make_model(len(tokenizer)).to(dtype)
    warm_up(model, tokenizer)
    before = snapshot(model)
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=20, fp16=dtype == torch.float16))
    bypass = get_adapter(model).bypass
    assert bypass.experts.dtype == torch.float32 and bypass.gate.weight.dtype == torch.float32
    assert bypass.experts.abs().sum() > 0 and torch.isfinite(bypass.experts).all()
    batch = tokenizer([e["prompt"] + " " + e["target_new"] for e in EDITS], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert get_adapter(model).last_report.final_loss < 6.0   # it trained (log(400) = 6.0 at the start)
    restore()
    assert_same_snapshot(model, before)
    assert all(p.dtype == dtype for p in model.parameters())


# ------------------------------------------------------------------ device_map / model_parallel
@pytest.fixture(scope="module")
def llama_dir(tokenizer):
    with tempfile.TemporaryDirectory() as directory:
        tiny_llama(len(tokenizer)).save_pretrained(directory)
        yield directory


ALL_CPU = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
           "lm_head": "cpu"}
LAYER3_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map", ["cpu", ALL_CPU, LAYER3_ON_DISK], ids=["cpu", "dict", "layer3-on-disk"])
def test_device_map_models(device_map, llama_dir, tokenizer, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=device_map, offload_folder=str(tmp_path))
    reference = tiny_llama(len(tokenizer))
    warm_up(model, tokenizer)
    before = snapshot(model, offloaded_grad=False)   # see test_offloaded_parameters_keep_requires_grad
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=40, model_parallel=True))
    adapter = get_adapter(model)
    layer_device = adapter.base_module.weight.device
    assert adapter.bypass.experts.device == layer_device and adapter.bypass.gate.weight.device == layer_device
    _, restore_ref = apply_memoe_to_model(reference, tokenizer, EDITS, make_hparams(steps=40))
    assert torch.allclose(adapter.bypass.experts, get_adapter(reference).bypass.experts, atol=1e-5)
    restore_ref()
    restore()
    assert_same_snapshot(model, before, offloaded_grad=False)


def test_offloaded_parameters_keep_requires_grad(llama_dir, tokenizer, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=LAYER3_ON_DISK, offload_folder=str(tmp_path))
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], make_hparams(steps=1, model_parallel=True))
    restore()
    assert [(name, p.requires_grad) for name, p in model.named_parameters()] == flags


def test_offloaded_wrapped_layer_fails_without_damage(llama_dir, tokenizer, tmp_path):
    """The wrapped layer offloaded to disk (weights on meta): today NotImplementedError
    ('Cannot copy out of meta tensor') from the first forward; proposed: ValueError up front."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    device_map = dict(LAYER3_ON_DISK, **{"model.layers.2": "disk", "model.layers.3": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=device_map, offload_folder=str(tmp_path))
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    names = list(model.state_dict())
    with pytest.raises((ValueError, NotImplementedError)):
        apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=1, model_parallel=True))
    assert get_adapter(model) is None and list(model.state_dict()) == names
    assert not any(isinstance(m, MoEBypass) for m in model.modules())
