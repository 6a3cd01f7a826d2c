"""The bypass layer: the paper's equation, expert selection, top-k weights, the balance loss, gate noise."""
import pytest
import torch

from memoe_plugin import MoEBypass
from memoe_plugin.routing.inputs import RoutingInputs


def layer_of(top_k=1, scale=1.0, gate_noise=0.0, feature_dim=0, base=None):
    return MoEBypass(base or torch.nn.Linear(8, 6), feature_dim, num_experts=4, top_k=top_k, scale=scale,
                     gate_noise=gate_noise)


def test_the_forward_is_the_papers_equation_with_one_expert_per_token():
    base = torch.nn.Linear(8, 6)
    layer = layer_of(base=base).eval()
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        routing_logits = layer.gate(x)
    chosen = routing_logits.argmax(-1)
    routing = RoutingInputs(outputs=[])
    out = layer(x, routing=routing)
    probs = routing_logits.softmax(-1)
    expected = base(x) + torch.stack([
        probs[b, t, chosen[b, t]] * (x[b, t] @ layer.experts[chosen[b, t]])
        for b in range(2) for t in range(5)]).reshape(2, 5, 6)
    assert torch.allclose(out, expected, atol=1e-5)
    (returned,) = routing.outputs                          # the call's routing comes back to the caller
    assert torch.equal(returned.routing[..., 0], chosen) and returned.aux_loss is None   # no loss in eval


def test_only_the_selected_experts_are_computed():
    """Experts no token chose hold NaN: a dense mixture (every expert, weighted by zero) would return NaN."""
    layer = layer_of(top_k=1)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        layer.experts.normal_()
        v = torch.randn(8)
        layer.gate.weight.zero_()
        layer.gate.weight[0], layer.gate.weight[1] = v, -v     # logits |v.x| > 0 for experts 0 or 1, 0 for 2, 3
        layer.experts[2:] = float("nan")
    out = layer.mixture(x)
    assert set(out.routing.unique().tolist()) <= {0, 1} and torch.isfinite(out.delta).all()
    one_hot = torch.nn.functional.one_hot(out.routing[..., 0], 4).float()
    dense = torch.einsum("bti,eio,bte->bto", x, layer.experts, one_hot)
    assert not torch.isfinite(dense).all()                   # the control: the dense sum is poisoned


def test_top2_weights_and_balance_loss():
    layer = layer_of(top_k=2, scale=0.5)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(3, 4, 8)
    probs = layer.gate(x).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    expected = sum(weights[..., k, None] * torch.einsum("bti,btio->bto", x, layer.experts[chosen[..., k]])
                   for k in range(2))
    assert torch.allclose(layer.mixture(x).delta, 0.5 * expected, atol=1e-5)
    layer.train()
    aux = layer.mixture(x).aux_loss
    # Switch loss: E * sum_e f_e P_e; equals 1 exactly when routing is uniform, >= 1/E always
    fraction = torch.nn.functional.one_hot(chosen[..., 0].reshape(-1), 4).float().mean(0)
    assert torch.allclose(aux, 4 * (fraction * probs.reshape(-1, 4).mean(0)).sum())


def test_gate_noise_only_while_training():
    layer = layer_of(gate_noise=5.0)
    with torch.no_grad():
        layer.experts.normal_()
    x = torch.randn(4, 8, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer.mixture(x).delta
    assert not torch.equal(first, layer.mixture(x).delta)


def test_routing_features_are_read_from_the_call_and_checked():
    layer = layer_of(feature_dim=3)
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="routing features None do not match"):
        layer(x)                                           # a bare call has no anchors: a clear error
    features = torch.randn(2, 5, 3)
    expected = layer.gate((torch.cat([x, features], -1) - layer.gate_shift) * layer.gate_scale).argmax(-1)
    out = layer.mixture(x, RoutingInputs(features=features))
    assert torch.equal(out.routing[..., 0], expected)
