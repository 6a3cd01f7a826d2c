"""Output memory (memory_rows): earlier edits' bypass outputs are kept and defended in later edits."""
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.training.memory import OutputMemory


def test_reservoir_keeps_capacity_and_counts_everything_seen():
    memory = OutputMemory(capacity=10, seed=0)
    for chunk in range(5):
        x = torch.full((4, 3), float(chunk))
        memory.add(x, None, x[:, :2])
    assert len(memory) == 10 and memory.seen == 20
    kept = set(memory.x[:, 0].tolist())
    assert 4.0 in kept or 3.0 in kept           # later rows do get in
    assert memory.x.dtype == torch.float16 and memory.features is None
    assert memory.nbytes == 10 * (3 + 2) * 2


def _first_edit_change(tokenizer, **memory_settings):
    """How much the second edit moves the bypass output on the first edit's remembered rows."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=30, memory_rows=1000, **memory_settings)
    apply_memoe_to_model(model, tokenizer, EDITS[:1], hp)
    adapter = get_adapter(model)
    memory = adapter.memory
    rows = len(memory)
    assert rows == len(tokenizer(EDITS[0]["prompt"] + " " + EDITS[0]["target_new"])["input_ids"])
    with torch.no_grad():
        assert memory.loss(adapter.bypass, 10_000).item() < 1e-5   # stored = current
    first = (memory.x[:rows].clone(), memory.features[:rows].clone(), memory.delta[:rows].clone())
    apply_memoe_to_model(model, tokenizer, EDITS[1:], hp)
    assert len(memory) > rows
    probe = OutputMemory(1000)
    probe.add(*first)
    with torch.no_grad():
        change = probe.loss(adapter.bypass, 10_000).item()
    remove_memoe(model)
    return change


def test_memory_holds_earlier_outputs_in_place(tokenizer):
    defended = _first_edit_change(tokenizer, memory_weight=10.0)
    undefended = _first_edit_change(tokenizer, memory_weight=0.0)
    assert defended < 0.5 * undefended, (defended, undefended)


def test_memory_is_dropped_with_the_adapter(tokenizer):
    model = tiny_llama(len(tokenizer))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS, make_hparams(steps=5, memory_rows=50))
    assert len(get_adapter(model).memory) > 0
    restore()
    assert get_adapter(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_penalty_draws_only_rows_of_the_experts_that_learn(tokenizer, monkeypatch):
    """With frozen experts (edits_per_expert), rows on them cannot move: drawing them would dilute the
    penalty more with every edit kept. The trainer draws from the learning experts' rows only."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=10, memory_rows=1000, memory_weight=1.0, locality_guard=True, scope_keys=True,
                      scope_threshold=0.3, expert_routing="key", edits_per_expert=2, num_experts=1)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)          # expert 0: full, frozen from now on
    adapter = get_adapter(model)
    first_rows = len(adapter.memory)
    apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)          # expert 1, not yet full
    memory, bypass = adapter.memory, adapter.bypass
    on_first, on_second = set(memory.rows_on(bypass, [0]).tolist()), set(memory.rows_on(bypass, [1]).tolist())
    assert on_first and on_second and on_first.isdisjoint(on_second)
    assert on_first | on_second == set(memory.rows_on(bypass, [0, 1]).tolist())
    assert len(on_first & set(range(first_rows))) > len(on_first) / 2   # mostly the first call's rows
    learning = memory.rows_on(bypass, [1]).tolist()
    drawn = []
    real = OutputMemory.loss
    monkeypatch.setattr(OutputMemory, "loss", lambda self, b, n, routes=None: drawn.append(routes) or
                        real(self, b, n, routes))
    more = {"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"}
    apply_memoe_to_model(model, tokenizer, [more], hp)             # expert 1 learns again
    assert drawn and all(routes.rows.tolist() == learning for routes in drawn)
    remove_memoe(model)


def test_rows_routed_once_per_call_give_what_routing_every_step_gives(tokenizer, monkeypatch):
    """The trainer routes the memory's rows once per edit call (the keys do not change within one), so
    that a training step does not match its drawn rows against every key kept so far. The outputs and the
    penalty must be those of routing the rows afresh through ``delta``."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=10, memory_rows=1000, memory_weight=1.0, locality_guard=True, scope_keys=True,
                      scope_threshold=0.3, scope_snap=1.0, expert_routing="key", edits_per_expert=2,
                      num_experts=1)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)
    adapter = get_adapter(model)
    memory, bypass = adapter.memory, adapter.bypass
    routes = memory.routes_on(bypass, [0, 1])
    assert 0 < len(routes.rows) <= len(memory) and routes.chosen.min() >= 0
    with torch.no_grad():
        fresh = bypass.mixture(memory.x[routes.rows].float().unsqueeze(0)).delta[0]
        ones = torch.ones(routes.chosen.shape)
        assert torch.equal(bypass.expert_sum(routes.inputs, routes.chosen, ones), fresh)
        assert fresh.abs().sum() > 0
        with torch.no_grad():
            bypass.experts.add_(0.01)                   # now the stored outputs are no longer met
        torch.manual_seed(0)
        cached = memory.loss(bypass, 10_000, routes)
        old = memory.delta[routes.rows].float()
        now = bypass.mixture(memory.x[routes.rows].float().unsqueeze(0)).delta[0]
        expected = (now - old).pow(2).sum(-1).mean() / old.pow(2).sum(-1).mean()
    assert cached.item() > 0 and torch.allclose(cached, expected, rtol=1e-5), (cached, expected)
    calls, stored = [], len(memory)
    real = type(bypass.scope.keys).match
    monkeypatch.setattr(type(bypass.scope.keys), "match", lambda self, x, allowed=None, sight=None, kind=None:
                        calls.append(x.detach().clone()) or real(self, x, allowed, sight))
    kept = memory.x.float().clone()
    more = {"prompt": "Marie Curie was born in", "target_new": "Tokyo", "subject": "Marie Curie"}
    apply_memoe_to_model(model, tokenizer, [more], hp)   # expert 1 learns again, for 10 steps
    dim = memory.x.shape[-1]
    # the memory is routed once in the call (all its rows at once) ...
    assert [tuple(x.shape) for x in calls].count((stored, dim)) == 1, [x.shape for x in calls]
    # ... and no other match reads rows of the memory (a step's drawn rows); the call's own batches read other inputs
    of_memory = [bool((torch.cdist(x.reshape(-1, dim).float(), kept).min(-1).values == 0).all())
                 for x in calls if tuple(x.shape) != (stored, dim)]
    assert not any(of_memory), [x.shape for x in calls]
    remove_memoe(model)


def test_with_the_snap_remembered_rows_stay_with_their_keys_when_later_keys_come(tokenizer):
    """The memory keeps the input the experts read (snapped), so a row of an earlier edit cannot snap to a
    later edit's key and ask the learning expert for an output it cannot give."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=10, memory_rows=1000, memory_weight=1.0, locality_guard=True, scope_keys=True,
                      scope_threshold=0.3, scope_snap=1.0, expert_routing="key", edits_per_expert=2,
                      num_experts=1)
    apply_memoe_to_model(model, tokenizer, EDITS[:2], hp)
    adapter = get_adapter(model)
    first_rows = len(adapter.memory)
    apply_memoe_to_model(model, tokenizer, EDITS[2:], hp)
    memory, bypass = adapter.memory, adapter.bypass
    assert set(range(first_rows)) <= set(memory.rows_on(bypass, [0]).tolist())
    with torch.no_grad():
        assert memory.loss(bypass, 10_000).item() < 1e-3   # every stored output still met
    remove_memoe(model)


def test_only_the_learning_experts_get_gradients_and_optimizer_state(tokenizer, monkeypatch):
    """With one expert per block of edits, the optimizer steps the learning experts alone: stepping
    every expert kept (and resetting the frozen ones) made each step cost more with every block."""
    model = tiny_llama(len(tokenizer))
    hp = make_hparams(steps=5, locality_guard=True, scope_keys=True, scope_threshold=0.3,
                      expert_routing="key", edits_per_expert=1, num_experts=1)
    stepped = []
    real = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda groups, **kw: stepped.append(
        [tuple(p.shape) for g in groups for p in g["params"]]) or real(groups, **kw))
    for request in EDITS:
        apply_memoe_to_model(model, tokenizer, [request], hp)
    bypass = get_adapter(model).bypass
    experts = bypass.experts.shape
    assert experts[0] == len(EDITS) and len(stepped) == len(EDITS)
    assert all(shapes[0] == (1, *experts[1:]) for shapes in stepped), stepped
    frozen = bypass.experts.detach().clone()
    apply_memoe_to_model(model, tokenizer, [dict(EDITS[0], target_new="Tokyo")], hp)   # a new expert learns
    assert torch.equal(bypass.experts[:len(EDITS)], frozen)                              # the others kept exactly
    assert not bypass.experts.requires_grad and bypass.expert_weight(0) is not None
    remove_memoe(model)
