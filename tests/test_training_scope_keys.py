"""training/scope_keys.py: which positions of an edit become the scope's keys, and the anti-keys' prompts."""
from conftest import EDITS, assert_edits_answered, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe


def scoped(**overrides):
    settings = dict(steps=80, locality_guard=True, scope_keys=True, scope_threshold=0.5)
    settings.update(overrides)
    return make_hparams(**settings)


def full_ids(tokenizer, request):
    return tokenizer(request["prompt"] + " " + request["target_new"])["input_ids"]


def test_after_anchor_keys_every_position_after_the_anchor_up_to_the_last_target(tokenizer):
    """`targets` keys the positions that predict a target token; `after_anchor` keys every position from the one
    after the anchor's last token up to the last target-predicting one (the anchor's own last token is left out:
    every prompt that names the subject has it). The edits take either way."""
    counts = {}
    for positions in ("targets", "after_anchor"):
        model = tiny_llama(len(tokenizer))
        apply_memoe_to_model(model, tokenizer, EDITS, scoped(scope_positions=positions))
        adapter = get_adapter(model)
        expected = []
        for edit, request in enumerate(EDITS):
            ids = full_ids(tokenizer, request)
            last = len(ids) - 2                                      # predicts the last target token
            if positions == "targets":
                first = len(tokenizer(request["prompt"])["input_ids"]) - 1
            else:
                onset = adapter.guard.active(ids).index(True)        # the anchor's last token
                first = onset + 1
            expected.append(last - first + 1)
            assert int((adapter.scope.edit_ids == edit).sum()) == last - first + 1, (positions, request)
        counts[positions] = sum(expected)
        assert_edits_answered(model, tokenizer, EDITS)
        remove_memoe(model)
    assert counts["after_anchor"] > counts["targets"]                # the prompts' words after the subject too


def test_anti_keys_belong_to_the_new_edits_only_once_each(tokenizer):
    """Each new edit's anti-key prompts are built once (a replayed or repeated request of the same edit adds
    none), and an edit without a subject the extractor can find gets none."""
    from memoe_plugin.training.scope_keys import anti_keys
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], scoped(scope_anti_keys="relation_bank",
                                                             scope_anti_relations=8))
    adapter = get_adapter(model)
    requests = [dict(EDITS[1], _edit=1), dict(EDITS[1], _edit=1), dict(EDITS[0], _edit=0),
                {"prompt": "the colour of the sky is", "target_new": "green", "_edit": 2}]
    views, ids, floors = anti_keys(adapter, requests, first_edit=1)
    assert views is not None and views.shape[0] == ids.shape[0] == floors.shape[0]
    assert set(ids.tolist()) == {1}                                  # edit 0 is older; edit 2 names no subject
    alone, _, _ = anti_keys(adapter, requests[:1], first_edit=1)
    assert alone.shape[0] == views.shape[0]                          # the repeat added nothing
    remove_memoe(model)
