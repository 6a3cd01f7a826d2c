"""``scope_values``: at the end of an edit call each of its keys keeps the bypass output its expert gives it, and the
experts are emptied.

With ``scope_snap: 1`` and key routing, a position that matches key ``k`` of edit ``i`` is read by edit ``i``'s
expert at the key's own input, so the bypass adds ``scale * W_e x_k`` there whatever the position's own input was: one
fixed row per key. Kept as that row (:meth:`..routing.scope.KeyScope.close`), an edit costs its keys and one output
row per key, not a share of an ``in x out`` expert; a later call trains fresh experts for its own keys only, so it
cannot move an earlier edit; and an edit can be taken out alone.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def close_keys(adapter) -> None:
    """Give every open key of ``adapter``'s scope its output and empty the experts (``scope_values``).

    The output is computed as :meth:`..layer.MoEBypass.expert_sum` computes it at a snapped position: the key's input
    in the layer's dtype, through its edit's expert, in the experts' dtype; ``scale`` is applied when it is read."""
    scope, bypass = adapter.scope, adapter.bypass
    first = scope.closed
    if first < len(scope):
        index = torch.arange(first, len(scope), device=scope.edit_ids.device)
        inputs = scope.key_inputs(index).to(bypass.base.weight.dtype).to(bypass.experts.dtype)
        expert = bypass.router.expert_of.to(index.device)[scope.edit_ids[index]]
        outputs = inputs.new_zeros(len(index), bypass.experts.shape[-1])
        for e in expert.unique().tolist():
            rows = (expert == e).nonzero().flatten()
            outputs[rows] = inputs[rows.to(inputs.device)] @ bypass.experts[e]
        scope.close(outputs)
    bypass.resize_experts(0)
