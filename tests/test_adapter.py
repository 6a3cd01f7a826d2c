"""The injector: attach, detach and reattach put back the very same modules."""
import pytest
import torch

from conftest import EDITS, assert_state_equal, state_copy
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe


def test_detach_and_reattach_toggle_the_edits_exactly(tiny_model, tokenizer):
    model, hparams = tiny_model
    saved = state_copy(model)
    apply_memoe_to_model(model, tokenizer, EDITS, hparams(steps=10))
    adapter = get_adapter(model)
    ids = tokenizer(EDITS[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        edited, = [model(input_ids=ids).logits]
        adapter.detach()
        assert get_adapter(model) is None
        assert_state_equal(model, saved)
        base = model(input_ids=ids).logits
        adapter.reattach()
        again = model(input_ids=ids).logits
    assert not torch.equal(base, edited) and torch.equal(again, edited)
    with pytest.raises(RuntimeError, match="already has"):
        adapter.reattach()
    remove_memoe(model)
    assert_state_equal(model, saved)
