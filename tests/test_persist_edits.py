"""Taking one edit back: ``remove_edits`` on a model, ``remove_edits_from_file`` and ``memoe-adapter`` on a file."""
import pytest
import torch

from conftest import EDITS, assert_state_equal, make_hparams, state_copy, tiny_llama
from memoe_plugin import (EditRemovalError, apply_memoe_to_model, get_adapter, list_edits, load_adapter,
                          remove_edits, remove_memoe, save_adapter)
from memoe_plugin.edits_cli import main as adapter_cli
from memoe_plugin.persist import remove_edits_from_file

MORE = [{"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"},
        {"prompt": "Watts Humphrey attended", "target_new": "Paris", "subject": "Watts Humphrey"}]
SETTINGS = dict(steps=60, locality_guard=True, scope_keys=True, scope_threshold=0.3, scope_snap=1.0,
                expert_routing="key", scope_values=True, num_experts=2, scope_stop_keys=True, scope_storage="int8")
ALL = EDITS + MORE


def texts(tokenizer):
    return tokenizer([e["prompt"] + " " + e["target_new"] for e in ALL], return_tensors="pt", padding=True)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def edited(tokenizer):
    """A tiny model edited in two sequential calls, with the unedited and the edited logits of every edit."""
    model = tiny_llama(len(tokenizer))
    saved, inputs = state_copy(model), texts(tokenizer)
    base = logits(model, inputs)
    hp = make_hparams(**SETTINGS)
    apply_memoe_to_model(model, tokenizer, ALL[:3], hp)
    apply_memoe_to_model(model, tokenizer, ALL[3:], hp)
    yield model, hp, inputs, base, logits(model, inputs), saved
    remove_memoe(model)


def test_removing_an_edit_gives_its_prompt_the_base_answers_and_leaves_the_others(edited, tokenizer):
    model, hp, inputs, base, before, _ = edited
    assert [e["prompt"] for e in list_edits(model)] == [e["prompt"] for e in ALL]
    assert not torch.allclose(before[1], base[1])           # the edit acts: the check below can fail
    removed = remove_edits(model, [1])
    assert removed == [ALL[1]]
    after = logits(model, inputs)
    assert torch.equal(after[1], base[1])                   # the base model's logits on its prompt again
    for i in (0, 2, 3, 4):
        assert torch.equal(after[i], before[i]), i          # every other edit exactly as it was
    assert [e["id"] for e in list_edits(model)] == [0, 1, 2, 3]
    assert [e["prompt"] for e in list_edits(model)] == [e["prompt"] for i, e in enumerate(ALL) if i != 1]
    adapter = get_adapter(model)
    assert set(adapter.scope.edit_ids.tolist()) == {0, 1, 2, 3}
    assert "japan" not in adapter.guard.keys and "marie curie" in adapter.guard.keys


def test_editing_goes_on_after_a_removal_and_restore_is_exact(edited, tokenizer):
    model, hp, inputs, base, before, saved = edited
    remove_edits(model, [0, 3])
    again = [{"prompt": "Apple A5 is developed by", "target_new": "Stanford University", "subject": "Apple A5"}]
    _, restore = apply_memoe_to_model(model, tokenizer, again, hp)
    assert [e["prompt"] for e in list_edits(model)][-1] == again[0]["prompt"] and len(list_edits(model)) == 4
    after = logits(model, inputs)
    for i in (1, 2, 4):
        assert torch.equal(after[i], before[i]), i
    restore()
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


def test_a_file_loses_the_same_edit_without_a_model(edited, tokenizer, tmp_path):
    model, hp, inputs, base, before, _ = edited
    path = save_adapter(model, tmp_path / "edits.safetensors")
    out, removed = remove_edits_from_file(path, [2], tmp_path / "fixed.safetensors")
    assert removed == [ALL[2]] and len(list_edits(path)) == 5 and len(list_edits(out)) == 4
    remove_edits(model, [2])
    fresh = tiny_llama(len(tokenizer))
    load_adapter(fresh, tokenizer, out)
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))
    remove_memoe(fresh)


def test_memoe_adapter_lists_and_removes_by_id_or_prompt(edited, tmp_path, capsys):
    model, *_ = edited
    path = save_adapter(model, tmp_path / "edits.safetensors")
    assert adapter_cli(["list", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "5 edits" in listed and "'Marie Curie was born in' -> 'Tokyo'" in listed
    assert adapter_cli(["remove", str(path), "--ids", "0", "--prompt", MORE[1]["prompt"]]) == 0
    assert [e["prompt"] for e in list_edits(path)] == [e["prompt"] for e in ALL[1:4]]
    assert adapter_cli(["remove", str(path), "--ids", "7"]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert adapter_cli(["remove", str(path), "--prompt", "Nobody asked this"]) == 2
    assert "no edit has the prompt" in capsys.readouterr().err


def test_edits_sharing_experts_are_refused_and_the_model_left_as_it_was(tokenizer):
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(**dict(SETTINGS, scope_values=False))
    apply_memoe_to_model(model, tokenizer, ALL[:3], hp)
    inputs = texts(tokenizer)
    before = logits(model, inputs)
    with pytest.raises(EditRemovalError, match="scope_values"):
        remove_edits(model, [0])
    with pytest.raises(EditRemovalError, match="do not exist"):
        remove_edits(model, [9])
    assert torch.equal(logits(model, inputs), before) and len(list_edits(model)) == 3
    remove_memoe(model)
