"""variants/: the scope variant (where the bypass acts) and key routing (which expert acts), unit by unit."""
import pytest
import torch

from memoe_plugin.routing.inputs import RoutingInputs
from memoe_plugin.routing.scope import KeyScope
from memoe_plugin.variants.key_routing import KeyRouter
from memoe_plugin.variants.scope import ScopeVariant, Selection


def scope_with_keys(threshold=0.9):
    scope = KeyScope(dim=4, threshold=threshold)
    scope.calibrate(torch.zeros(3, 4))   # centre at 0: the keys are the unit rows themselves
    scope.add(torch.eye(4)[:2], torch.tensor([0, 1]))
    return scope


def test_selection_everywhere_and_restrict():
    x = torch.randn(2, 3, 4)
    everywhere = Selection.everywhere(x)
    chosen = torch.tensor([[[0], [1], [2]], [[3], [0], [1]]])
    assert not everywhere.nowhere and torch.equal(everywhere.restrict(chosen), chosen)
    active = torch.tensor([[True, False, True], [False, False, False]])
    limited = Selection(active, None, x)
    assert torch.equal(limited.restrict(chosen)[..., 0], torch.tensor([[0, -1, 2], [-1, -1, -1]]))
    assert Selection(torch.zeros(2, 3, dtype=torch.bool), None, x).nowhere


def test_scope_variant_narrows_the_guard_mask_to_positions_near_a_key():
    x = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]])
    variant = ScopeVariant(scope_with_keys())
    where = variant.select(x, RoutingInputs())                         # no guard: the keys alone decide
    assert where.active.tolist() == [[True, True, False]] and where.edit[where.active].tolist() == [0, 1]
    guarded = variant.select(x, RoutingInputs(active=torch.tensor([[False, True, True]])))
    assert guarded.active.tolist() == [[False, True, False]]
    allowed = torch.tensor([[[True, False]] * 3])                      # only edit 0 in sight
    assert variant.select(x, RoutingInputs(allowed=allowed)).active.tolist() == [[True, False, False]]
    shut = variant.select(x, RoutingInputs(active=torch.zeros(1, 3, dtype=torch.bool)))
    assert shut.nowhere and shut.edit is None                          # nothing matched when the guard is shut
    assert ScopeVariant(None).select(x, RoutingInputs()).active is None
    with pytest.raises(RuntimeError, match="locality-guard mask"):
        variant.select(x, RoutingInputs(active=torch.ones(1, 2, dtype=torch.bool)))


def test_a_scope_that_reads_an_earlier_block_needs_its_states():
    x = torch.tensor([[[0, 0, 1.0, 0]]])
    variant = ScopeVariant(scope_with_keys(), reads_block=True)
    states = torch.tensor([[[1.0, 0, 0, 0]]])                          # the earlier block's view matches key 0
    assert variant.select(x, RoutingInputs(states=states)).edit.tolist() == [[0]]
    with pytest.raises(RuntimeError, match="scope_layer"):
        variant.select(x, RoutingInputs())


def test_key_router_gives_each_edit_its_expert_and_grows_the_mixture():
    router = KeyRouter()
    assert router.assign(0, 5, per_expert=0, num_experts=2) is None    # round robin: every expert learns
    assert router.expert_of.tolist() == [0, 1, 0, 1, 0]
    router = KeyRouter()
    assert router.assign(0, 3, per_expert=2, num_experts=4) == [0, 1]
    assert router.assign(3, 2, per_expert=2, num_experts=4) == [1, 2]  # only the newest experts learn
    assert router.expert_of.tolist() == [0, 0, 1, 1, 2] and router.needed_experts == 3
    router.truncate(3)
    assert router.needed_experts == 2
    where = Selection(torch.tensor([True, True, False]), torch.tensor([2, -1, 0]), torch.zeros(3, 4))
    chosen, weights = router.route(where)
    assert chosen[..., 0].tolist() == [1, -1, -1] and torch.equal(weights, torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="scope_keys"):
        router.route(Selection(None, None, torch.zeros(3, 4)))
