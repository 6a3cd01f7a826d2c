"""The Switch load-balancing loss as a pure function."""
import torch

from memoe_plugin.losses import switch_load_balancing_loss


def test_uniform_routing_gives_one_and_collapse_gives_the_number_of_experts():
    uniform = torch.full((8, 4), 0.25)
    assert torch.isclose(switch_load_balancing_loss(uniform, torch.arange(8) % 4, 4), torch.tensor(1.0))
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    assert torch.isclose(switch_load_balancing_loss(collapsed, torch.zeros(8, dtype=torch.long), 4),
                         torch.tensor(4.0))


def test_guarded_and_masked_tokens_are_left_out():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], requires_grad=True)
    top1 = torch.tensor([0, 1, -1])                      # -1: the guard kept this position silent
    keep = torch.tensor([True, False, True])             # and the second one is padding
    loss = switch_load_balancing_loss(probs, top1, 2, keep)
    assert torch.isclose(loss, torch.tensor(2 * 1.0 * 0.9))   # only the first token counts
    empty = switch_load_balancing_loss(probs, torch.tensor([-1, -1, -1]), 2)
    assert empty.item() == 0.0
    empty.backward()                                     # still connected to the router
    assert probs.grad is not None
