"""What one forward call of the bypass reads besides its input, and what it gives back.

EasyEdit and ``generate`` call the model with token ids only, so the model-level injector
(:class:`..adapter.MEMoEAdapter`) computes the routing inputs of every call from the ids and hands
them to the bypass as an explicit ``routing`` argument (a per-call pre-forward hook adds the keyword,
as PEFT injects per-call arguments into its tuner layers). The bypass returns its routing and its
balance loss with its output (:class:`MixtureOutput`), as Mixtral's sparse block returns its router
logits, and keeps nothing of the call on the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass
class RoutingInputs:
    """The routing inputs of one forward call. Every field is optional; None means "not used"."""
    features: Optional[torch.Tensor] = None     # [batch, seq, dim]: the knowledge anchors (None: the gate sees x)
    token_mask: Optional[torch.Tensor] = None   # [batch, seq]: real (non-padding) tokens, for the balance loss
    active: Optional[torch.Tensor] = None       # [batch, seq]: the locality guard's positions (None: everywhere)
    allowed: Optional[torch.Tensor] = None      # [batch, seq, m]: whether each position sees the anchors of the
    #                                             edit ``sight[j]`` (column j); only edits some position sees
    sight: Optional[torch.Tensor] = None        # [m] (long, ascending): the edit of each column of ``allowed``
    #                                             (None: column j is edit j)
    states: Optional[torch.Tensor] = None       # [batch, seq, dim]: what the key scope reads, when it reads an
    #                                             earlier block (scope_layer); filled by a hook on that block
    source: Optional[torch.Tensor] = None       # [batch, seq] (long): the position of this call whose input the
    #                                             key scope reads at each position: itself, or inside the chat
    #                                             template's own tokens the conversation's last token before them
    #                                             (-1: none, out of scope); None: every position reads itself
    kind: Optional[torch.Tensor] = None         # [batch, seq] (int8): what each position is for the key scope:
    #                                             plain text, a conversation's own token after a chat template
    #                                             token, or a chat template token (``routing.template``); a key
    #                                             matches positions of its own kind only. None: all plain. Rows
    #                                             given without ``source`` (the output memory's) have the view of
    #                                             their template tokens in ``states``
    outputs: Optional[list] = None              # when a list: the bypass appends its MixtureOutput here


class MixtureOutput(NamedTuple):
    """What one call of the mixture computed."""
    delta: torch.Tensor                 # [..., out]: scale * sum_e G_e W_e x (zero where no expert acts)
    routing: torch.Tensor               # [..., top_k]: the experts each position went to, -1 for none
    aux_loss: Optional[torch.Tensor]    # the Switch balance loss while training, else None
    expert_input: torch.Tensor          # [..., in]: what the experts read (x, snapped in scope)
