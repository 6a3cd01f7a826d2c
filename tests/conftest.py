"""Shared fixtures: a tokenizer trained in memory and tiny random GPT-2 / Llama models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from memoe_plugin.assets.tiny import tiny_gpt2, tiny_llama, train_tokenizer  # noqa: F401 (fixtures' helpers)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _private_cache() -> None:
    """The tests write only into a temporary cache (``MEMOE_CACHE``), never into the user's: relation prototypes of
    tiny random models, exports and assembled model files all land there and go with it. Complete model exports and
    assembled model files already in the user's cache are linked in, to be read, so that the suite does not export
    SmolLM2 again on every run; an export a test makes goes to the temporary cache."""
    import atexit
    import shutil
    import tempfile
    from memoe_plugin.assets.gguf_export import is_complete_export
    from memoe_plugin.paths import cache_dir
    user, private = cache_dir(), Path(tempfile.mkdtemp(prefix="memoe-tests-cache-"))
    if user.is_dir():
        for entry in user.iterdir():
            if entry.is_dir() and entry.name != "gguf" and is_complete_export(entry):
                (private / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        if (user / "gguf").is_dir():
            (private / "gguf").mkdir()
            for file in (user / "gguf").glob("*.gguf"):
                (private / "gguf" / file.name).symlink_to(file.resolve())
    os.environ["MEMOE_CACHE"] = str(private)
    atexit.register(shutil.rmtree, private, True)


_private_cache()
# EASYEDIT_PATH=../shared/easyedit is relative to where pytest starts; some tests change directory
# (AlphaEdit writes its projection into the working directory), so pin it to an absolute path now.
if os.environ.get("EASYEDIT_PATH"):
    os.environ["EASYEDIT_PATH"] = os.path.abspath(os.environ["EASYEDIT_PATH"])
# CI's EasyEdit stack sets this: there, an EasyEdit integration test that skips is a failure.
REQUIRE_EASYEDIT = os.environ.get("MEMOE_REQUIRE_EASYEDIT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_EASYEDIT and report.skipped and item.get_closest_marker("easyedit") is not None:
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"MEMOE_REQUIRE_EASYEDIT=1 but this EasyEdit test skipped: {reason}"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "What university did Watts Humphrey attend? Stanford University.",
    "Which family does Epaspidoceras belong to? Aspidoceratidae.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Apple A5 is developed by Apple. Toko Yasuda plays the guitar.",
    "In Wales, an official language is Welsh. Marie Curie was born in Warsaw.",
    "The Eiffel Tower is located in Paris. Leonardo da Vinci painted the Mona Lisa.",
    "Who is the father of Marie Curie? Wladyslaw Sklodowski is her father.",
    "the a of in is was by to and for with on at from who what which where when",
]


def _train_tokenizer():
    return train_tokenizer(CORPUS)


@pytest.fixture(scope="session")
def tokenizer():
    return _train_tokenizer()


LLAMA_TEMPLATE = "model.layers.{}.mlp.down_proj"
GPT2_TEMPLATE = "transformer.h.{}.mlp.c_proj"


def make_hparams(template=LLAMA_TEMPLATE, **overrides):
    from memoe_plugin import MEMoEHyperParams
    values = dict(alg_name="MEMoE", model_name="tiny-llama", device="cpu", layer=2, module_template=template,
                  num_experts=4, top_k=1, lr=5e-2, steps=40, anchor_backend="offline", early_stop=False)
    values.update(overrides)
    return MEMoEHyperParams.from_dict(values)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tokenizer):
    """(model, hparams-maker) for each architecture."""
    if request.param == "llama":
        return tiny_llama(len(tokenizer)), lambda **kw: make_hparams(LLAMA_TEMPLATE, **kw)
    return tiny_gpt2(len(tokenizer)), lambda **kw: make_hparams(GPT2_TEMPLATE, model_name="tiny-gpt2", **kw)


def assert_edits_answered(model, tokenizer, requests):
    """Every request's target is the model's greedy prediction after its prompt, token by token."""
    for request in requests:
        full = tokenizer(request["prompt"] + " " + request["target_new"], return_tensors="pt")
        n = len(tokenizer(request["prompt"])["input_ids"])
        with torch.no_grad():
            got = model(**full).logits[0].argmax(-1)[n - 1:-1].tolist()
        assert got == full["input_ids"][0, n:].tolist(), request


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    state = model.state_dict()
    assert list(state) == list(saved)
    for key, value in state.items():
        assert torch.equal(value, saved[key]), key


EDITS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "Welsh", "subject": "Danielle Darrieux"},
    {"prompt": "The capital of Japan is", "target_new": "Warsaw", "subject": "Japan"},
    {"prompt": "Toko Yasuda plays the", "target_new": "violin", "subject": "Toko Yasuda"},
]


def pytest_report_header(config):
    import transformers
    return (f"memoe_plugin stack: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"EASYEDIT_PATH={os.environ.get('EASYEDIT_PATH') or '(unset)'}, "
            f"EasyEdit tests required: {REQUIRE_EASYEDIT}")


def interrupted_and_straight(tokenizer, hp, calls, path):
    """The same sequential calls made on one tiny Llama straight through, and on another saved to ``path`` before the
    last call, loaded into a fresh model and continued: ``(straight, resumed, path)``, both adapters' states checked
    equal tensor for tensor. The caller removes both adapters."""
    from memoe_plugin import apply_memoe_to_model, get_adapter, load_adapter, remove_memoe, save_adapter
    straight, first = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer))
    for call in calls:
        apply_memoe_to_model(straight, tokenizer, call, hp)
    for call in calls[:-1]:
        apply_memoe_to_model(first, tokenizer, call, hp)
    save_adapter(first, path)
    remove_memoe(first)
    resumed = tiny_llama(len(tokenizer))
    load_adapter(resumed, tokenizer, path)
    apply_memoe_to_model(resumed, tokenizer, calls[-1], hp)
    tensors_a, info_a = get_adapter(straight).state()
    tensors_b, info_b = get_adapter(resumed).state()
    assert set(tensors_a) == set(tensors_b) and info_a == info_b
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    return straight, resumed, path


def rewrite(src: Path, dst: Path, change_document=None, change_tensors=None, change_metadata=None):
    """Copy an adapter file, editing its JSON document / tensors / raw header metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    document = json.loads(metadata["memoe"])
    if change_document:
        change_document(document)
    if change_tensors:
        change_tensors(tensors, document)
    metadata["memoe"] = json.dumps(document)
    if change_metadata:
        change_metadata(metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst
