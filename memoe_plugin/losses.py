"""Losses of the method, as pure functions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def switch_load_balancing_loss(router_probs: torch.Tensor, top1: torch.Tensor, num_experts: int,
                               keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2021, eq. 4).

    ``E * sum_e f_e * P_e``, where ``f_e`` is the fraction of tokens whose top-1 expert is ``e``
    and ``P_e`` the mean router probability of ``e``. It is 1 when routing is uniform and grows
    to ``E`` when one expert takes everything.

    Args:
        router_probs: ``[tokens, E]`` softmax probabilities of the router.
        top1: ``[tokens]`` index of each token's top-1 expert; negative means "no expert" (a
            position the locality guard keeps silent), and the token is left out.
        num_experts: ``E``.
        keep: optional ``[tokens]`` bool mask of the tokens to count (e.g. not padding).

    Returns:
        A scalar; zero (still connected to ``router_probs``) when no token counts.
    """
    mask = top1 >= 0
    if keep is not None:
        mask = mask & keep.to(mask.device).bool()
    probs, top1 = router_probs[mask], top1[mask]
    if top1.numel() == 0:
        return router_probs.sum() * 0.0
    fraction = F.one_hot(top1, num_experts).float().mean(dim=0)
    return num_experts * (fraction * probs.float().mean(dim=0)).sum()
