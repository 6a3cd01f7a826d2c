"""The key scope and key routing: the bypass acts where its input matches an edited position's key."""
import pytest
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.training.trainer import TrainingDivergedError
from memoe_plugin.routing.scope import KeyScope
from memoe_plugin.routing.template import IN_CHAT, PLAIN, TEMPLATE, USER

MORE = [{"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"},
        {"prompt": "The Eiffel Tower is located in", "target_new": "Rome", "subject": "Eiffel Tower"},
        {"prompt": "Watts Humphrey attended", "target_new": "Paris", "subject": "Watts Humphrey"}]


def scoped(**overrides):
    settings = dict(steps=80, locality_guard=True, scope_keys=True, scope_threshold=0.5)
    settings.update(overrides)
    return make_hparams(**settings)


def predicted(model, tokenizer, request):
    full = tokenizer(request["prompt"] + " " + request["target_new"], return_tensors="pt")
    n = len(tokenizer(request["prompt"])["input_ids"])
    with torch.no_grad():
        return model(**full).logits[0].argmax(-1)[n - 1:-1].tolist(), full["input_ids"][0, n:].tolist()


def test_keys_are_the_target_predicting_positions_and_edits_take(tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, scoped())
    adapter = get_adapter(model)
    targets = sum(len(tokenizer(e["prompt"] + " " + e["target_new"])["input_ids"]) -
                  len(tokenizer(e["prompt"])["input_ids"]) for e in EDITS)
    assert len(adapter.scope) == targets
    assert sorted(set(adapter.scope.edit_ids.tolist())) == [0, 1, 2]
    assert adapter.guard.owners["japan"] == {1}
    for request in EDITS:
        got, wanted = predicted(model, tokenizer, request)
        assert got == wanted
    remove_memoe(model)


def test_positions_outside_the_scope_get_the_base_output_exactly(tokenizer):
    model = tiny_llama(len(tokenizer))
    # names an edited subject (the guard lets it through) but is another text: far from every key
    probe = tokenizer("Danielle Darrieux Danielle Darrieux the of in is was", return_tensors="pt")
    with torch.no_grad():
        before = model(**probe).logits
    apply_memoe_to_model(model, tokenizer, EDITS, scoped(scope_threshold=0.999))
    adapter = get_adapter(model)
    with torch.no_grad(), adapter.recording() as outputs:
        after = model(**probe).logits
    routing = outputs[-1].routing[0, :, 0]
    assert (routing == -1).all() and torch.equal(after, before)
    remove_memoe(model)


def test_a_position_is_compared_only_with_the_keys_of_edits_in_sight(tokenizer):
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, scoped(scope_threshold=-1.0))   # every allowed key matches
    adapter = get_adapter(model)
    ids = torch.tensor([tokenizer("Toko Yasuda plays the")["input_ids"]])
    inputs = adapter.routing_features(ids, None)
    allowed = inputs.allowed[0]
    assert inputs.sight.tolist() == [2]            # one column, for the only edit whose anchor the prompt names
    assert not allowed[0].any()                    # before the anchor: no edit in sight
    assert allowed[-1].tolist() == [True]          # after "Toko Yasuda": edit 2
    assert (adapter.route(ids)[0, -1] >= 0).all()
    none = adapter.routing_features(torch.tensor([tokenizer("The weather is mild")["input_ids"]]), None)
    assert none.allowed.shape[-1] == 0 and none.sight.numel() == 0   # no anchor in sight: no column at all
    remove_memoe(model)


def test_match_reads_each_allowed_column_as_the_edit_sight_names():
    scope = KeyScope(4, threshold=0.5)
    scope.add(torch.eye(4)[:3] + 0.01, torch.tensor([0, 5, 9]))     # one key for each of edits 0, 5 and 9
    x = torch.eye(4)[:3] + 0.01                                       # each row nearest the key of its own edit
    sight = torch.tensor([5, 9])
    allowed = torch.tensor([[True, True], [True, False], [False, True]])   # row 0 may see 5 and 9, not 0
    found = scope.match(x, allowed, sight)
    assert found.edit[1].item() == 5                    # row 1 sees edit 5, its own key
    assert found.edit[2].item() == 9
    assert found.edit[0].item() in (5, 9)               # row 0's own key (edit 0) is out of sight
    dense = torch.zeros(3, 10, dtype=torch.bool)
    dense[:, sight] = allowed                           # the same, one column per edit id
    assert torch.equal(scope.match(x, dense).edit, found.edit)


def test_key_routing_gives_each_edit_its_expert_and_freezes_full_experts(tokenizer):
    model = tiny_llama(len(tokenizer))
    hp = scoped(expert_routing="key", edits_per_expert=2, num_experts=1, scope_threshold=0.9)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    adapter = get_adapter(model)
    assert adapter.bypass.experts.shape[0] == 1 and adapter.bypass.router.expert_of.tolist() == [0, 0]
    first = adapter.bypass.experts[0].clone()
    apply_memoe_to_model(model, tokenizer, EDITS[2:] + MORE[:1], hp)
    assert adapter.bypass.experts.shape[0] == 2 and adapter.bypass.router.expert_of.tolist() == [0, 0, 1, 1]
    assert torch.equal(adapter.bypass.experts[0], first)       # the full expert did not move
    for edit, request in enumerate(EDITS + MORE[:1]):
        ids = torch.tensor([tokenizer(request["prompt"])["input_ids"]])
        assert adapter.route(ids)[0, -1, 0].item() == adapter.bypass.router.expert_of[edit].item()
        got, wanted = predicted(model, tokenizer, request)
        assert got == wanted
    remove_memoe(model)


def test_a_failed_call_takes_its_keys_owners_and_experts_back(tokenizer, monkeypatch):
    model = tiny_llama(len(tokenizer))
    hp = scoped(expert_routing="key", edits_per_expert=2, num_experts=1)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    adapter = get_adapter(model)
    keys, owners, experts = len(adapter.scope), adapter.guard.state(), adapter.bypass.experts.clone()
    from memoe_plugin.layer import MoEBypass
    real = MoEBypass.expert_sum
    monkeypatch.setattr(MoEBypass, "expert_sum", lambda self, *a: real(self, *a) * float("nan"))
    with pytest.raises(TrainingDivergedError):
        apply_memoe_to_model(model, tokenizer, EDITS[2:] + MORE, hp)
    assert len(adapter.scope) == keys and adapter.guard.state() == owners
    assert torch.equal(adapter.bypass.experts, experts) and adapter.bypass.router.expert_of.tolist() == [0, 0]
    remove_memoe(model)


def test_key_routing_needs_the_key_scope():
    with pytest.raises(ValueError, match="expert_routing"):
        make_hparams(expert_routing="key")


def test_snap_moves_in_scope_rows_toward_their_keys_input_only():
    from memoe_plugin.routing.scope import KeyScope
    scope = KeyScope(3, threshold=0.5, snap=0.25)
    scope.calibrate(torch.zeros(1, 3))
    scope.add(torch.tensor([[4.0, 0.0, 0.0], [0.0, 8.0, 0.0]]), torch.tensor([0, 1]))
    x = torch.tensor([[[2.0, 0.5, 0.0], [0.0, 0.0, 1.0], [0.3, 4.0, 0.0]]])
    match = scope.match(x)
    assert match.key[0].tolist() == [0, 0, 1] and match.edit[0].tolist() == [0, 0, 1]
    where = match.similarity >= scope.threshold
    assert where[0].tolist() == [True, False, True]
    snapped = scope.snap_inputs(x, match.key, where)
    assert torch.allclose(snapped[0, 0], torch.lerp(x[0, 0], torch.tensor([4.0, 0, 0]), 0.25))
    assert torch.equal(snapped[0, 1], x[0, 1])                                  # out of scope: untouched
    assert torch.allclose(snapped[0, 2], torch.lerp(x[0, 2], torch.tensor([0, 8.0, 0]), 0.25))
    plain = KeyScope(3, threshold=0.5)
    plain.add(torch.ones(1, 3), torch.tensor([0]))
    assert len(plain.inputs) == 0                                                # snap 0 keeps no inputs


def _last_position(model, adapter, ids):
    """(bypass input, bypass output minus the base's, experts chosen) at the last position of ``ids``."""
    got = {}
    hook = adapter.bypass.register_forward_hook(lambda m, a, out: got.update(x=a[0], d=out - m.base(a[0])))
    with torch.no_grad(), adapter.recording() as outputs:
        model(input_ids=ids)
    hook.remove()
    return got["x"][0, -1], got["d"][0, -1], outputs[-1].routing[0, -1]


@pytest.mark.parametrize("snap", [0.0, 0.5, 1.0])
def test_the_expert_reads_the_input_moved_toward_the_matched_keys(snap, tokenizer):
    request = EDITS[0]
    reworded = torch.tensor([tokenizer(request["prompt"].replace(" is", " was") + " really")["input_ids"]])
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], scoped(scope_threshold=-1.0, scope_snap=snap, expert_routing="key"))
    adapter = get_adapter(model)
    x, delta, routed = _last_position(model, adapter, reworded)
    key = int(adapter.scope.match(x).key)
    assert adapter.scope.edit_ids[key] == 0
    read = x if snap == 0 else torch.lerp(x, adapter.scope.key_inputs(torch.tensor(key)).float(), snap)
    expert = adapter.bypass.experts[int(routed[0])]
    assert torch.allclose(delta, adapter.hparams.scale * read @ expert, atol=1e-5)
    if snap:
        assert not torch.allclose(read, x, atol=1e-3)    # the rewording is not at its key: snapping moved it
    remove_memoe(model)


def test_snap_needs_the_key_scope_and_a_share():
    with pytest.raises(ValueError, match="scope_snap"):
        make_hparams(scope_snap=0.5)
    with pytest.raises(ValueError, match="scope_snap"):
        make_hparams(scope_keys=True, scope_snap=1.5)


# ----------------------------------------------------------------------------- anti-keys and scope_layer
def anti_scoped(**overrides):
    settings = dict(scope_threshold=-1.0, scope_anti_keys="relation_bank", scope_layer=1, expert_routing="key")
    settings.update(overrides)
    return scoped(**settings)


def test_anti_keys_rule_nearness_and_the_floor_of_an_anti_key_in_the_edits_own_words():
    from memoe_plugin.routing.scope import NO_FLOOR, KeyScope
    scope = KeyScope(3, threshold=0.0)
    scope.calibrate(torch.zeros(1, 3))
    scope.add(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    # edit 0's anti-keys: one asked another way (no floor), one worded as the edit itself (floor 0.97)
    scope.add_anti_keys(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.2, 0.0]]), torch.tensor([0, 0]),
                        torch.tensor([NO_FLOOR, 0.97]))
    rows = torch.tensor([[1.0, 0.05, 0.0],     # the edit's own question: nearer the key than any anti-key
                         [0.5, 1.0, 0.0],      # nearer the other relation's anti-key than the key: out
                         [1.0, 0.1, 0.3],      # nearer the same-frame anti-key, but no near-copy of it: in
                         [1.0, 0.2, 0.01]])    # a near-copy of the same-frame anti-key: out
    found = scope.match(rows)
    assert found.blocked.tolist() == [False, True, False, True]
    assert scope.in_scope(rows).tolist() == [True, False, True, False]
    sizes = scope.sizes()
    scope.add_anti_keys(torch.ones(2, 3), torch.tensor([0, 0]), torch.tensor([NO_FLOOR, NO_FLOOR]))
    scope.truncate(sizes)                                             # a failed call takes its anti-keys back
    assert scope.sizes() == (1, 2, 0)


def test_another_relation_of_the_subject_is_kept_out_while_the_edit_takes(tokenizer):
    """The bank's own question about the edited subject is an anti-key of the edit: out of scope exactly."""
    model = tiny_llama(len(tokenizer))
    other = tokenizer("The place of birth of Danielle Darrieux is", return_tensors="pt")["input_ids"]
    apply_memoe_to_model(model, tokenizer, EDITS, anti_scoped())
    adapter = get_adapter(model)
    owned = adapter.scope.anti_edit_ids
    assert sorted(set(owned.tolist())) == [0, 1, 2]
    assert adapter.scope.anti_keys.shape[1] == model.config.hidden_size     # the residual stream of block 1
    _, delta, routed = _last_position(model, adapter, other)
    assert routed[0] == -1 and not delta.any()                              # the bypass adds exactly nothing
    for request in EDITS:
        got, wanted = predicted(model, tokenizer, request)
        assert got == wanted
    remove_memoe(model)


def test_without_anti_keys_that_question_is_in_scope(tokenizer):
    """The control of the test above: with every key in reach, only the anti-keys keep it out."""
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, anti_scoped(scope_anti_keys="none"))
    adapter = get_adapter(model)
    _, delta, routed = _last_position(model, adapter, tokenizer("The place of birth of Danielle Darrieux is",
                                                                return_tensors="pt")["input_ids"])
    assert routed[0] >= 0 and delta.any()
    remove_memoe(model)


def test_a_scope_read_from_an_earlier_block_routes_generate_as_teacher_forcing_and_leaves_no_hook(tokenizer):
    from conftest import assert_state_equal, state_copy
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    block = model.model.layers[1]
    hooks_before = len(block._forward_pre_hooks)
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, anti_scoped(scope_threshold=0.2, scope_rank=8))
    adapter = get_adapter(model)
    assert adapter.scope.keys.shape[1] == 8 and len(block._forward_pre_hooks) == hooks_before + 1
    prompt = tokenizer("Tell me: the mother tongue of Danielle Darrieux is", return_tensors="pt")
    with torch.no_grad(), adapter.recording() as outputs:
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    steps = [out.routing[0, -1] for out in outputs]
    n = prompt["input_ids"].shape[1]
    teacher = adapter.route(generated)[0][n - 1:n - 1 + 5]
    assert torch.equal(torch.stack(steps[:5]), teacher)
    restore()
    assert len(block._forward_pre_hooks) == hooks_before
    assert_state_equal(model, saved)


def test_anti_keys_and_scope_layer_are_checked():
    with pytest.raises(ValueError, match="scope_anti_keys"):
        make_hparams(scope_anti_keys="relation_bank")                   # needs scope_keys
    with pytest.raises(ValueError, match="scope_layer"):
        scoped(scope_layer=3)                                           # after the bypass (layer 2)
    with pytest.raises(ValueError, match="scope_anti_keys"):
        scoped(scope_anti_keys="wordnet")


def test_anti_keys_and_the_scopes_directions_survive_save_and_load(tokenizer, tmp_path):
    from memoe_plugin import load_adapter, save_adapter
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS, anti_scoped(scope_rank=8, scope_threshold=0.2))
    probe = tokenizer("The place of birth of Danielle Darrieux is Welsh", return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits
    scope = get_adapter(model).scope
    save_adapter(model, tmp_path / "a.safetensors")
    remove_memoe(model)
    loaded = load_adapter(model, tokenizer, tmp_path / "a.safetensors").scope
    for name in ("basis", "keys", "anti_keys", "anti_edit_ids", "anti_floor"):
        assert torch.equal(getattr(loaded, name), getattr(scope, name)), name
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, expected)
    remove_memoe(model)


def test_int8_rows_keep_each_row_within_half_a_step_of_its_scale():
    from memoe_plugin.routing.scope import pack_rows, unpack_rows
    rows = torch.randn(50, 64) * torch.logspace(-3, 2, 50).unsqueeze(-1)      # rows of very different sizes
    stored, scale = pack_rows(rows, torch.int8)
    assert stored.dtype == torch.int8 and scale.shape == (50,)
    back = unpack_rows(stored, scale)
    assert ((back - rows).abs() <= scale.unsqueeze(-1) * 0.5001).all()
    assert (stored.abs().amax(-1) == 127).all()                               # each row uses the full range
    half, none = pack_rows(rows, torch.float16)
    assert half.dtype == torch.float16 and none.numel() == 0 and torch.equal(unpack_rows(half, none), half.float())


def test_int8_scope_keeps_half_the_bytes_decides_as_float16_and_survives_save_and_load(tokenizer, tmp_path):
    """The same edits with the scope's rows kept as int8: the edits take, the other relation's question stays
    out, the bytes per key row fall from 2 to 1 per feature (plus a 4-byte scale), and a saved adapter loads
    to the same outputs; a file saved as int8 refuses float16 hparams."""
    from memoe_plugin import load_adapter, save_adapter
    other = tokenizer("The place of birth of Danielle Darrieux is", return_tensors="pt")["input_ids"]
    sizes, decisions = {}, {}
    probes = [tokenizer(p, return_tensors="pt")["input_ids"] for p in
              ["The mother tongue of Danielle Darrieux is", "Where does Toko Yasuda live?",
               "The place of birth of Danielle Darrieux is", "Danielle Darrieux speaks"]]
    for storage in ("float16", "int8"):
        model = tiny_llama(len(tokenizer))
        apply_memoe_to_model(model, tokenizer, EDITS, anti_scoped(scope_snap=1.0, scope_storage=storage))
        adapter = get_adapter(model)
        scope = adapter.scope
        assert scope.keys.dtype == scope.anti_keys.dtype == scope.inputs.dtype == getattr(torch, storage)
        sizes[storage] = (scope.nbytes, len(scope), scope.anti_keys.shape[0])
        widths = sum(getattr(scope, name).shape[0] * getattr(scope, name).shape[1] for name in scope.SCALES)
        rows = sum(getattr(scope, name).shape[0] for name in scope.SCALES)
        decisions[storage] = [adapter.route(ids)[0].tolist() for ids in probes]
        _, delta, routed = _last_position(model, adapter, other)
        assert routed[0] == -1 and not delta.any()
        for request in EDITS:
            got, wanted = predicted(model, tokenizer, request)
            assert got == wanted
        if storage == "int8":
            probe = tokenizer("The mother tongue of Danielle Darrieux is Welsh", return_tensors="pt")
            with torch.no_grad():
                expected = model(**probe).logits
            save_adapter(model, tmp_path / "int8.safetensors")
            remove_memoe(model)
            loaded = load_adapter(model, tokenizer, tmp_path / "int8.safetensors").scope
            for name in ("keys", "key_scale", "anti_keys", "anti_scale", "inputs", "input_scale"):
                assert torch.equal(getattr(loaded, name), getattr(scope, name)), name
            with torch.no_grad():
                assert torch.equal(model(**probe).logits, expected)
            remove_memoe(model)
        else:
            remove_memoe(model)
    assert decisions["int8"] == decisions["float16"]
    (b16, keys, anti), (b8, keys8, anti8) = sizes["float16"], sizes["int8"]
    assert (keys, anti) == (keys8, anti8)
    assert b16 - b8 == widths - 4 * rows          # 1 byte less per feature, 4 more per row for its scale


def test_an_int8_file_without_its_scales_or_with_another_storage_is_refused(tokenizer, tmp_path):
    from test_persist import rewrite
    from memoe_plugin import load_adapter, save_adapter
    model = tiny_llama(len(tokenizer))
    apply_memoe_to_model(model, tokenizer, EDITS[:1], anti_scoped(scope_storage="int8"))
    path = save_adapter(model, tmp_path / "int8.safetensors") or tmp_path / "int8.safetensors"
    remove_memoe(model)
    no_scale = rewrite(path, tmp_path / "no_scale.safetensors",
                       change_tensors=lambda tensors, document: tensors.pop("scope.anti_scale"))
    with pytest.raises(ValueError, match="anti_scale.*corrupt"):
        load_adapter(model, tokenizer, no_scale)
    assert get_adapter(model) is None

    def claim_float16(document):
        document["hparams"]["scope_storage"] = "float16"
    other = rewrite(path, tmp_path / "other.safetensors", change_document=claim_float16)
    with pytest.raises(ValueError, match="scope_storage"):
        load_adapter(model, tokenizer, other)
    assert get_adapter(model) is None


def test_a_random_projection_is_orthonormal_fixed_by_the_seed_and_kept_through_calibration_and_a_save(
        tokenizer, tmp_path):
    from memoe_plugin import load_adapter, save_adapter
    from memoe_plugin.routing.scope import KeyScope
    scope = KeyScope(64, threshold=0.5, rank=16, projection="random", seed=3)
    basis = scope.basis.clone()
    assert torch.allclose(basis.t() @ basis, torch.eye(16), atol=1e-5)
    assert torch.equal(KeyScope(64, threshold=0.5, rank=16, projection="random", seed=3).basis, basis)
    assert not torch.equal(KeyScope(64, threshold=0.5, rank=16, projection="random", seed=4).basis, basis)
    scope.calibrate(torch.randn(20, 64))
    assert torch.equal(scope.basis, basis)                          # the first call's inputs do not choose it
    model = tiny_llama(len(tokenizer))
    hp = scoped(scope_rank=16, scope_projection="random", scope_snap=1.0, expert_routing="key", scope_values=True,
                scope_threshold=0.3)
    apply_memoe_to_model(model, tokenizer, EDITS, hp)
    for request in EDITS:
        got, wanted = predicted(model, tokenizer, request)
        assert got == wanted
    adapter = get_adapter(model)
    assert adapter.scope.keys.shape[1] == 16 and adapter.scope.inputs.shape[0] == 0
    path = save_adapter(model, tmp_path / "projected.safetensors")
    fresh = tiny_llama(len(tokenizer))
    loaded = load_adapter(fresh, tokenizer, path)
    assert torch.equal(loaded.scope.basis, adapter.scope.basis)
    ids = tokenizer([EDITS[0]["prompt"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, fresh(**ids).logits)
    remove_memoe(model)
    remove_memoe(fresh)


def test_a_projected_scope_keeps_subject_vectors_projected_and_makes_the_same_anti_keys():
    """With ``rank`` the subject vector is kept as its projection (rank features, not the input's width), and the
    made anti-keys are the views the full vectors would give."""
    from memoe_plugin.routing.scope import KeyScope
    generator = torch.Generator().manual_seed(0)
    effects, offsets = torch.randn(2, 5, 64, generator=generator), torch.randn(2, 64, generator=generator)
    vector = torch.randn(64, generator=generator)
    full, projected = KeyScope(64, threshold=0.5), KeyScope(64, threshold=0.5, rank=16, projection="random", seed=1)
    for scope in (full, projected):
        scope.calibrate(torch.randn(10, 64, generator=torch.Generator().manual_seed(1)))
        scope.set_prototypes(effects, offsets)
        scope.add(torch.randn(1, 64, generator=torch.Generator().manual_seed(2)), torch.tensor([0]))
        skip = torch.zeros(1, 5, dtype=torch.bool)
        skip[0, 2] = True
        scope.add_subjects(vector.unsqueeze(0), torch.tensor([0]), skip)
    assert projected.subjects.shape == (1, 16) and full.subjects.shape == (1, 64)
    made, _ = projected.anti_keys_of(0)
    wanted = projected.view(full.prototype_inputs(vector, 0))
    assert made.shape == (8, 16) and torch.allclose(made, wanted, atol=2e-3)


@pytest.mark.parametrize("reads_plain", [False, True])
def test_a_replys_token_matches_plain_keys_only_with_chat_reads_plain(reads_plain):
    scope = KeyScope(4, threshold=0.5, chat_reads_plain=reads_plain)
    scope.calibrate(torch.zeros(1, 4))
    keys = torch.eye(4)[:3]
    scope.add(keys, torch.tensor([0, 0, 1]), kind=torch.tensor([PLAIN, TEMPLATE, IN_CHAT]))
    rows = torch.eye(4)[:3]
    for kind, own in ((PLAIN, 0), (TEMPLATE, 1), (IN_CHAT, 2), (USER, None)):
        found = scope.match(rows, kind=torch.full((3,), kind))
        expected = [i == own or (reads_plain and kind == IN_CHAT and i == 0) for i in range(3)]
        assert ((found.similarity >= scope.threshold) & (found.key == torch.arange(3))).tolist() == expected, kind
