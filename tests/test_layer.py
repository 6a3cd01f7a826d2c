"""The bypass layer: expert selection, top-k weights, the balance loss, gate noise."""
import torch

from memoe_plugin import MoEBypass
from memoe_plugin.layer import RoutingContext


def test_only_selected_experts_are_computed(tokenizer):
    context = RoutingContext(0)
    base = torch.nn.Linear(8, 6)
    layer = MoEBypass(base, context, num_experts=4, top_k=1, scale=1.0, gate_noise=0.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        routing_logits = layer.gate(x)
    chosen = routing_logits.argmax(-1)
    out = layer(x)
    probs = routing_logits.softmax(-1)
    expected = base(x) + torch.stack([
        probs[b, t, chosen[b, t]] * (x[b, t] @ layer.experts[chosen[b, t]])
        for b in range(2) for t in range(5)]).reshape(2, 5, 6)
    assert torch.allclose(out, expected, atol=1e-5)
    # each token went to exactly one expert
    assert layer.last_routing.shape == (2, 5, 1)


def test_top2_weights_and_balance_loss():
    context = RoutingContext(0)
    layer = MoEBypass(torch.nn.Linear(8, 6), context, num_experts=4, top_k=2, scale=0.5, gate_noise=0.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(3, 4, 8)
    probs = layer.gate(x).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    expected = sum(weights[..., k, None] * torch.einsum("bti,btio->bto", x, layer.experts[chosen[..., k]])
                   for k in range(2))
    assert torch.allclose(layer.delta(x), 0.5 * expected, atol=1e-5)
    layer.train()
    layer.delta(x)
    # Switch loss: E * sum_e f_e P_e; equals 1 exactly when routing is uniform, >= 1/E always
    fraction = torch.nn.functional.one_hot(chosen[..., 0].reshape(-1), 4).float().mean(0)
    assert torch.allclose(layer.aux_loss, 4 * (fraction * probs.reshape(-1, 4).mean(0)).sum())


def test_gate_noise_only_while_training():
    context = RoutingContext(0)
    layer = MoEBypass(torch.nn.Linear(8, 6), context, num_experts=4, top_k=1, scale=1.0, gate_noise=5.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(4, 8, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer.delta(x)
    assert not torch.equal(first, layer.delta(x))
