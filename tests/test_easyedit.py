"""MEMoE through EasyEdit's own BaseEditor: edit, batch_edit with rollback, sequential editing.

These tests need an EasyEdit checkout: set EASYEDIT_PATH to its root (and run in
an environment with its requirements). Without one they are reported as skipped.
"""
import os

import pytest

from conftest import EDITS, SHARED_DATA, assert_state_equal, make_hparams, state_copy, tiny_llama

EASYEDIT_PATH = os.environ.get("EASYEDIT_PATH")
pytestmark = [pytest.mark.easyedit,
              pytest.mark.skipif(not EASYEDIT_PATH, reason="EASYEDIT_PATH is not set: no EasyEdit checkout")]


@pytest.fixture(scope="module")
def easyeditor():
    import memoe_plugin
    try:
        memoe_plugin.register(EASYEDIT_PATH)
    except memoe_plugin.EasyEditNotFoundError as err:
        pytest.skip(f"EasyEdit at {EASYEDIT_PATH} does not import: {err}")
    import easyeditor
    return easyeditor


@pytest.fixture
def editor(easyeditor, tokenizer, tmp_path):
    """A BaseEditor over a tiny Llama saved where EasyEdit can load it (name contains 'llama')."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    hparams = make_hparams(model_name=str(model_dir), steps=40)
    editor = easyeditor.BaseEditor.from_hparams(hparams)
    return editor, state_copy(editor.model)


def request_lists(edits):
    return dict(prompts=[e["prompt"] for e in edits], target_new=[e["target_new"] for e in edits],
                subject=[e["subject"] for e in edits],
                rephrase_prompts=[e["prompt"].replace("The ", "the ") for e in edits],
                locality_inputs={"neighborhood": {"prompt": ["Who is the father of Marie Curie?"] * len(edits),
                                                  "ground_truth": ["Wladyslaw"] * len(edits)}})


def test_registration_is_idempotent_and_in_place(easyeditor):
    import memoe_plugin
    from easyeditor.editors import editor as editor_module
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.editors.utils import CALLABLE_RESTORE_ALGS
    from easyeditor.util.alg_dict import ALG_DICT
    memoe_plugin.register(EASYEDIT_PATH)
    memoe_plugin.register(EASYEDIT_PATH)
    assert ALG_DICT["MEMoE"] is memoe_plugin.apply_memoe_to_model
    assert editor_module.ALG_DICT is ALG_DICT            # the dict was mutated, not rebound
    assert "MEMoE" in CALLABLE_RESTORE_ALGS
    assert BatchEditor.is_batchable_method("MEMoE")
    assert BatchEditor.is_batchable_method("MEMIT") and not BatchEditor.is_batchable_method("GRACE")
    assert memoe_plugin.is_registered()


def test_single_edit_restores_after_each(editor):
    editor, saved = editor
    metrics, edited_model, _ = editor.edit(**request_lists(EDITS), sequential_edit=False, verbose=False)
    assert len(metrics) == len(EDITS)
    for m in metrics:
        assert m["post"]["rewrite_acc"] == [1.0]
        assert "neighborhood_acc" in m["post"]["locality"]
    assert_state_equal(editor.model, saved)


def test_batch_edit_rolls_back_between_chunks(editor):
    editor, saved = editor
    editor.hparams.batch_size = 2
    edits = EDITS + [{"prompt": "The Eiffel Tower is located in", "target_new": "Tokyo", "subject": "Eiffel Tower"}]
    metrics, _, restore = editor.batch_edit(**request_lists(edits), sequential_edit=False, verbose=False)
    assert len(metrics) == len(edits)
    assert all(m["post"]["rewrite_acc"] == [1.0] for m in metrics)
    assert callable(restore)
    assert_state_equal(editor.model, saved)       # rolled back after the last chunk as well
    from memoe_plugin import get_adapter
    assert get_adapter(editor.model) is None


def test_sequential_batch_edit_accumulates_then_restores(editor):
    from memoe_plugin import get_adapter
    editor, saved = editor
    editor.hparams.batch_size = 2
    editor.hparams.steps = 80
    edits = EDITS + [{"prompt": "The Eiffel Tower is located in", "target_new": "Tokyo", "subject": "Eiffel Tower"}]
    metrics, edited_model, restore = editor.batch_edit(**request_lists(edits), sequential_edit=True, verbose=False)
    adapter = get_adapter(edited_model)
    assert adapter is not None and len(adapter.edits) == len(edits)
    assert metrics[-1]["post"]["rewrite_acc"] == [1.0]
    restore()
    assert_state_equal(editor.model, saved)


def test_sequential_single_edits(editor):
    from memoe_plugin import get_adapter
    editor, saved = editor
    metrics, edited_model, restore = editor.edit(**request_lists(EDITS), sequential_edit=True, verbose=False)
    assert len(get_adapter(edited_model).edits) == len(EDITS)
    restore()
    assert_state_equal(editor.model, saved)


@pytest.mark.skipif(not (SHARED_DATA / "zsre_mend_eval_portability_gpt4.json").exists(), reason="no ../shared/data")
def test_zsre_records_through_easyedit_loader(easyeditor, editor):
    """EasyEdit's own ZsreDataset feeds batch_edit; the metrics come back and the model is restored."""
    editor, saved = editor
    dataset = easyeditor.ZsreDataset(str(SHARED_DATA / "zsre_mend_eval_portability_gpt4.json"), size=4)
    records = [dataset[i] for i in range(4)]
    editor.hparams.batch_size = 4
    metrics, _, _ = editor.batch_edit(
        prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
        rephrase_prompts=[r["rephrase_prompt"] for r in records],
        locality_inputs={"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                          "ground_truth": [r["locality_ground_truth"] for r in records]}},
        sequential_edit=False, verbose=False)
    assert len(metrics) == 4 and all("rewrite_acc" in m["post"] for m in metrics)
    assert_state_equal(editor.model, saved)


def _nltk_unusable():
    from memoe_plugin.routing.extractors import NLTKDataMissingError, NLTKExtractor
    try:
        NLTKExtractor()
    except NLTKDataMissingError as err:
        return str(err)
    return None


@pytest.mark.parametrize("routing_input, anchor_backend", [
    ("anchor", "offline"), ("anchor", "auto"), ("anchor", "nltk"), ("sentence", "offline"), ("token", "offline")])
def test_batch_edit_with_every_routing_mode_and_backend(editor, routing_input, anchor_backend):
    import warnings
    editor, saved = editor
    editor.hparams.routing_input, editor.hparams.anchor_backend = routing_input, anchor_backend
    editor.hparams.batch_size = 3
    editor.hparams.steps = 80
    if anchor_backend == "nltk" and _nltk_unusable():
        # without nltk >= 3.9 and its NER data the backend refuses, naming the fix, and nothing is changed
        from memoe_plugin.routing.extractors import NLTKDataMissingError
        with pytest.raises(NLTKDataMissingError, match="nltk"):
            editor.batch_edit(**request_lists(EDITS), sequential_edit=False, verbose=False)
        assert_state_equal(editor.model, saved)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # auto may warn that it falls back to offline
        metrics, _, _ = editor.batch_edit(**request_lists(EDITS), sequential_edit=False, verbose=False)
    assert all(m["post"]["rewrite_acc"] == [1.0] for m in metrics)
    assert_state_equal(editor.model, saved)


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"


@pytest.mark.parametrize("evaluation_type", ["generate-text", "LLM-judge"])
def test_easyedits_real_world_evaluation_runs_from_a_memoe_file(easyeditor, tokenizer, tmp_path, evaluation_type):
    """``evaluation_type`` in a MEMoE file reaches EasyEdit unchanged: its real-world evaluation (greedy decoding
    with natural stop criteria) scores the edits; without an api_key, LLM-judge falls back to exact match."""
    import yaml
    from memoe_plugin import MEMoEHyperParams
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE          # EasyEdit's generate_texts applies the chat template
    try:
        tokenizer.save_pretrained(model_dir)
    finally:
        tokenizer.chat_template = None
    settings = make_hparams(model_name=str(model_dir), steps=40).to_dict()
    settings.update(evaluation_type=evaluation_type, use_chat_template=False, api_key=None, batch_size=3)
    path = tmp_path / "memoe.yaml"
    path.write_text(yaml.safe_dump(settings))
    hparams = MEMoEHyperParams.from_hparams(path)
    assert hparams.evaluation_type == evaluation_type
    editor = easyeditor.BaseEditor.from_hparams(hparams)
    saved = state_copy(editor.model)
    metrics, _, _ = editor.batch_edit(**request_lists(EDITS), sequential_edit=False, verbose=False)
    assert len(metrics) == len(EDITS)
    for m in metrics:
        assert isinstance(m["post"]["rewrite_gen_content"], list)
        assert "neighborhood_acc" in m["post"]["locality"]
        if evaluation_type == "LLM-judge":
            assert all(score in (0.0, 1.0) for score in m["post"]["rewrite_acc"])
    assert_state_equal(editor.model, saved)
