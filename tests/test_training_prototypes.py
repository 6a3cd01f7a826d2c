"""Relation prototypes (scope_anti_keys: prototypes): built once per model and layer, cached, refused for another
model or layer, and the anti-keys they make per edit."""
from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, EDITS, LLAMA_TEMPLATE, make_hparams

from memoe_plugin import apply_memoe_to_model, get_adapter, load_adapter, save_adapter
from memoe_plugin.assets.tiny import tiny_llama, train_chat_tokenizer
from memoe_plugin.routing import prototypes as proto
from memoe_plugin.routing.relations import GENERIC_SUBJECTS, RELATIONS
from memoe_plugin.training import prototypes as building


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path))
    return tmp_path / "relations"


def hparams(**overrides):
    values = dict(locality_guard=True, scope_keys=True, scope_threshold=0.4, scope_snap=1.0, expert_routing="key",
                  scope_anti_keys="prototypes", scope_anti_relations=8, scope_anti_probes=2, steps=30)
    values.update(overrides)
    return make_hparams(LLAMA_TEMPLATE, **values)


def count_builds(monkeypatch) -> list:
    built = []
    real = building.build_prototypes
    monkeypatch.setattr(building, "build_prototypes", lambda adapter, identity, progress=False: built.append(1) or
                        real(adapter, identity, progress))
    return built


def test_prototypes_are_built_once_per_model_and_layer_and_read_from_the_cache(tokenizer, cache, monkeypatch):
    built = count_builds(monkeypatch)
    model = tiny_llama(len(tokenizer))
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:2], hparams())
    scope = get_adapter(model).scope
    assert built == [1] and len(list(cache.glob("*.safetensors"))) == 1
    assert scope.proto_effects.shape == (1, 8, model.config.intermediate_size)   # plain text only: no template
    assert scope.subjects.shape[0] == 2                                       # one subject vector per edit
    effects = scope.proto_effects.clone()
    apply_memoe_to_model(model, tokenizer, EDITS[2:], hparams())              # a later call: nothing rebuilt
    restore()
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams())  # a new adapter, same model: the file
    assert built == [1]
    assert torch.equal(get_adapter(model).scope.proto_effects, effects)
    restore()
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams(layer=1))   # another layer: built anew
    assert built == [1, 1] and len(list(cache.glob("*.safetensors"))) == 2
    restore()
    other = tiny_llama(len(tokenizer), seed=7)                                 # other weights: built anew
    _, restore = apply_memoe_to_model(other, tokenizer, EDITS[:1], hparams())
    assert built == [1, 1, 1]
    restore()


def test_a_prototypes_file_of_another_model_or_layer_is_refused(tokenizer, cache):
    model = tiny_llama(len(tokenizer))
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams())
    adapter = get_adapter(model)
    identity = building.prototype_identity(adapter)
    path = proto.cache_path(identity)
    assert proto.load_prototypes(path, identity).relations == tuple(list(RELATIONS)[:8])
    for key, value in (("module", "model.layers.1.mlp.down_proj"), ("weight_sha256", "0" * 64)):
        with pytest.raises(ValueError, match=f"another model or layer \\({key} differ"):
            proto.load_prototypes(path, dict(identity, **{key: value}))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable relation-prototypes file"):
        proto.load_prototypes(path, identity)
    restore()


def test_the_prototypes_are_relation_effects_over_generic_subjects(tokenizer, cache):
    plain = torch.randn(len(GENERIC_SUBJECTS), 5, 7)
    chat = plain + 3.0
    effects, offsets = proto.relation_effects(plain, {"chat": chat})
    assert torch.allclose(effects[0], plain.mean(0) - plain.mean((0, 1)), atol=1e-6)
    assert torch.allclose(effects[1], effects[0], atol=1e-5)     # a context that shifts every input moves no effect
    assert torch.allclose(offsets[1], torch.full((7,), 3.0), atol=1e-5) and not offsets[0].any()


def test_made_anti_keys_keep_another_relation_of_the_subject_out_and_cost_a_few_passes(tokenizer, cache):
    """On a subject whose layer inputs are exactly subject + relation (so that the prototypes are exact), an edit's
    made anti-key for another relation blocks that relation's question, and not the edit's own."""
    from memoe_plugin.routing.scope import KeyScope
    torch.manual_seed(0)
    dim, relations = 16, 4
    effects = torch.randn(1, relations, dim)
    subject = torch.randn(dim) * 0.3
    scope = KeyScope(dim, threshold=0.0)
    scope.calibrate(torch.zeros(1, dim))
    scope.set_prototypes(effects, torch.zeros(1, dim))
    own = subject + effects[0, 1]
    scope.add(own.unsqueeze(0), torch.tensor([0]))
    scope.add_subjects(subject.unsqueeze(0), torch.tensor([0]), torch.tensor([[False, True, False, False]]))
    other = subject + effects[0, 2]
    found = scope.match(torch.stack([own + 0.01 * torch.randn(dim), other]))
    assert found.blocked.tolist() == [False, True]
    anti, _ = scope.anti_keys_of(0)
    assert anti.shape[0] == relations - 1                       # its own relation asks nothing of itself


def test_prototype_anti_keys_survive_save_and_load_in_chat(cache, tmp_path):
    tokenizer = train_chat_tokenizer(CORPUS)
    model = tiny_llama(len(tokenizer))
    hp = hparams(chat="auto")
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    scope = get_adapter(model).scope
    assert scope.proto_effects.shape[0] == 2                     # plain text and the chat template
    save_adapter(model, tmp_path / "a.safetensors")
    text = tokenizer(get_adapter(model).template.wrap(EDITS[0]["prompt"]), return_tensors="pt")
    with torch.no_grad():
        before = model(**text).logits
    fresh = tiny_llama(len(tokenizer))
    load_adapter(fresh, tokenizer, tmp_path / "a.safetensors")
    loaded = get_adapter(fresh).scope
    for name in ("subjects", "subject_ids", "subject_skip", "proto_effects", "proto_offsets", "key_kind"):
        assert torch.equal(getattr(loaded, name), getattr(scope, name)), name
    with torch.no_grad():
        assert torch.allclose(fresh(**text).logits, before, atol=1e-6)



def test_the_shipped_sequential_file_keeps_the_same_scope_across_calls_on_a_tiny_model(cache, monkeypatch):
    """smollm2-135m-sequential.yaml ships the batch file's scope: on a tiny chat model, edits made in two sequential
    calls (no rollback) each get their subject vector against prototypes built once (plain and chat), keys taken in
    raw and chat-wrapped text, stop keys after the answers and int8 storage; unloading restores the model exactly."""
    from conftest import assert_state_equal, state_copy

    from memoe_plugin import MEMoEHyperParams
    from memoe_plugin.assets import hparams_path
    from memoe_plugin.routing.template import PLAIN, TEMPLATE
    built = count_builds(monkeypatch)
    tokenizer = train_chat_tokenizer(CORPUS)
    model = tiny_llama(len(tokenizer))
    saved = state_copy(model)
    hp = MEMoEHyperParams.from_hparams(hparams_path("MEMoE") / "smollm2-135m-sequential.yaml")
    assert (hp.scope_anti_keys, hp.scope_stop_keys, hp.chat, hp.scope_storage) == ("prototypes", True, "auto", "int8")
    hp.layer, hp.device, hp.anchor_backend, hp.steps, hp.lr, hp.lr_width = 2, "cpu", "offline", 20, 5e-2, 0
    hp.scope_threshold, hp.scope_anti_relations, hp.memory_rows = 0.0, 8, 0
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)                # sequential: no rollback in between
    scope = get_adapter(model).scope
    assert built == [1] and len(list(cache.glob("*.safetensors"))) == 1
    assert sorted(scope.subject_ids.tolist()) == [0, 1, 2]              # one subject vector per edit, both calls
    assert scope.proto_effects.shape[:2] == (2, 8)                       # plain and chat prototypes
    assert scope.keys.dtype == torch.int8
    assert {PLAIN, TEMPLATE} <= set(scope.key_kind.tolist())             # raw and chat-wrapped keys
    assert (scope.anti_floor < 0).any()                                  # stop keys after the answers
    for row, edit in enumerate(scope.subject_ids.tolist()):   # made: each relation it neither asks nor resembles,
        made = 2 * int((~scope.subject_skip[row]).sum())        # in both contexts; kept: its stop keys
        kept = int((scope.anti_edit_ids == edit).sum())
        assert scope.anti_keys_of(edit)[0].shape[0] == made + kept
    restore()
    assert get_adapter(model) is None
    assert_state_equal(model, saved)


def test_a_made_anti_key_that_would_block_its_own_edit_is_left_out():
    """A relation whose prototype, for this subject, lands where the edit's own key is (as on a random model, whose
    layer inputs hardly depend on the relation) never becomes the edit's anti-key: the edit's own prompt stays in
    scope; a relation that lands elsewhere stays an anti-key."""
    from memoe_plugin.routing.scope import KeyScope
    torch.manual_seed(0)
    dim = 16
    effects = torch.randn(1, 3, dim)
    effects[0, 2] = effects[0, 1] + 0.01 * torch.randn(dim)      # relation 2 looks like the edit's relation 1
    subject = torch.randn(dim) * 0.3
    scope = KeyScope(dim, threshold=0.0, anti_margin=-0.1)
    scope.calibrate(torch.zeros(1, dim))
    scope.set_prototypes(effects, torch.zeros(1, dim))
    own = subject + effects[0, 1]
    scope.add(own.unsqueeze(0), torch.tensor([0]))
    near = building.blocks_own_keys(scope, subject, 0, own.unsqueeze(0))
    assert near.tolist() == [False, True, True]                 # its own relation and its look-alike
    scope.add_subjects(subject.unsqueeze(0), torch.tensor([0]), near.unsqueeze(0))
    found = scope.match(torch.stack([own, subject + effects[0, 0]]))
    assert found.blocked.tolist() == [False, True]
    assert building.blocks_own_keys(scope, subject, 5, own.unsqueeze(0)).tolist() == [False] * 3  # no keys
    assert building.blocks_own_keys(scope, subject, 0, None).tolist() == [False] * 3   # no position seen


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_the_check_reads_the_live_position_against_the_stored_key_as_the_scope_does(storage):
    """A live input at the edit's answer position is its stored key only up to the key's rounding: the check compares
    the live position with the stored key and with the anti-key made from the subject vector as kept, exactly as
    the scope decides in use, so a made anti-key is left out exactly when it would shut the edit's own position
    (seen on a tiny random Qwen: 0.0005 short of blocking the stored key, it blocked the live position)."""
    from memoe_plugin.routing.scope import KeyScope
    torch.manual_seed(0)
    dim, relations = 64, 24
    live = torch.randn(3, dim)                                   # the edit's key positions as the scope read them
    subject = torch.randn(dim) * 0.3
    # relations whose made anti-key lands at about the margin's distance from the first position, either side
    effects = torch.stack([live[0] - subject + spread * torch.randn(dim)
                           for spread in torch.linspace(0.3, 0.7, relations)]).unsqueeze(0)
    scope = KeyScope(dim, threshold=0.0, anti_margin=-0.1, storage=storage)
    scope.calibrate(torch.zeros(1, dim))
    scope.set_prototypes(effects, torch.zeros(1, dim))
    scope.add(live, torch.tensor([0, 0, 0]))
    near = building.blocks_own_keys(scope, subject, 0, live)
    assert 0 < int(near.sum()) < relations                       # both kinds occur: the case is a real test
    for r in range(relations):                                   # each relation kept alone as the edit's anti-key
        skip = torch.ones(1, relations, dtype=torch.bool)
        skip[0, r] = False
        probe = KeyScope(dim, threshold=0.0, anti_margin=-0.1, storage=storage)
        probe.calibrate(torch.zeros(1, dim))
        probe.set_prototypes(effects, torch.zeros(1, dim))
        probe.add(live, torch.tensor([0, 0, 0]))
        probe.add_subjects(subject.unsqueeze(0), torch.tensor([0]), skip)
        assert bool(probe.match(live).blocked.any()) == bool(near[r]), r


def test_made_anti_keys_are_cached_exactly_and_made_anew_when_their_inputs_change():
    """Generating token by token asks an edit's made anti-keys at every step: they are kept (the same numbers as
    made anew), and a new subject vector, new prototypes or a truncation make them again."""
    from memoe_plugin.routing.scope import KeyScope
    torch.manual_seed(0)
    dim = 16
    scope = KeyScope(dim, threshold=0.0)
    scope.calibrate(torch.randn(4, dim))
    scope.set_prototypes(torch.randn(1, 3, dim), torch.zeros(1, dim))
    scope.add(torch.randn(2, dim), torch.tensor([0, 1]))
    scope.add_subjects(torch.randn(1, dim), torch.tensor([0]), torch.tensor([[False, True, False]]))
    first, _ = scope.anti_keys_of(0)
    subject = scope.rows("subjects", torch.tensor([0]))[0]
    assert torch.equal(first, scope.view(scope.prototype_inputs(subject, 0)))
    assert scope.anti_keys_of(0)[0] is not None and len(scope._made) == 1
    scope.add_subjects(torch.randn(1, dim), torch.tensor([1]), torch.tensor([[True, False, False]]))
    assert len(scope._made) == 0                                   # a new subject vector: made again
    assert torch.equal(scope.anti_keys_of(0)[0], first)
    scope.set_prototypes(torch.randn(1, 3, dim), torch.zeros(1, dim))
    assert not torch.equal(scope.anti_keys_of(0)[0], first)        # other prototypes, other anti-keys
    scope.truncate((1, 0, 0))
    assert scope.anti_keys_of(0)[0].shape[0] == 0                  # its subject vector taken back: none left


def test_measuring_the_prototypes_shows_progress_when_asked(tokenizer, cache, capsys):
    """The first edit of a model measures its relation prototypes (about 30 s on SmolLM2): with progress (memoe-edit)
    a bar says so; later calls read the cache and show none."""
    model = tiny_llama(len(tokenizer))
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams(), progress=True)
    restore()
    assert "relation prototypes" in capsys.readouterr().err
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams(), progress=True)
    restore()
    assert "relation prototypes" not in capsys.readouterr().err


def test_texts_that_share_a_head_run_it_once_and_read_the_same_views(cache):
    """Prompts asked through a chat template share its head (the system turn): scope_views runs that head once per
    batch from a KV cache and reads what a full pass of each prompt alone reads."""
    from memoe_plugin.training import capture
    tokenizer = train_chat_tokenizer(CORPUS)
    model = tiny_llama(len(tokenizer))
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams(chat="on"))
    adapter = get_adapter(model)
    texts = [adapter.template.wrap(e["prompt"]) for e in EDITS]
    runs = []
    real = capture._head_cache
    capture._head_cache = lambda *args: runs.append(1) or real(*args)
    try:
        together = capture.scope_views(adapter, texts, own_last=True)
    finally:
        capture._head_cache = real
    alone = torch.cat([capture.scope_views(adapter, [text], own_last=True) for text in texts])
    assert runs == [1] and torch.allclose(together, alone, atol=1e-5)
    restore()


def test_views_read_before_a_template_tail_equal_those_of_the_whole_prompt(cache):
    """scope_views runs each batch only up to the last token it reads (the template's tail after the question is
    cut): the views equal those a full pass of the whole wrapped prompt gives at that token."""
    from memoe_plugin.training import capture
    tokenizer = train_chat_tokenizer(CORPUS)
    model = tiny_llama(len(tokenizer))
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], hparams(chat="on"))
    adapter = get_adapter(model)
    texts = [adapter.template.wrap(e["prompt"]) for e in EDITS[:3]]
    target = adapter.scope_block if adapter.scope_block is not None else adapter.bypass
    lengths = []
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    try:
        views = capture.scope_views(adapter, texts, own_last=True)
    finally:
        handle.remove()
    seen = []
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"])[0]), with_kwargs=True)
    adapter.bypass.enabled, expected = False, []
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            own = adapter.template.last_own(ids[0].tolist())
            assert own < ids.shape[1] - 1   # the template puts tokens after the question: there is a tail to cut
            with torch.no_grad():
                model(input_ids=ids)
            expected.append(seen.pop()[own].float())
    finally:
        handle.remove()
        adapter.bypass.enabled = True
    assert torch.allclose(views, torch.stack(expected), atol=1e-5)
    owns = [adapter.template.last_own(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    assert sum(lengths) == max(owns) + 1   # the shared head, then the rest: cut after the last token read
    restore()
