"""``scope_keys``: the keys of a call's edits, and their anti-keys, taken from the unedited model before training."""
from __future__ import annotations

from typing import Optional

import torch

from ..routing.relations import SAME_FRAME, anti_key_prompts
from ..routing.scope import ANY_FLOOR, NO_FLOOR
from .batches import EditBatch
from .capture import run_batches, scope_views


@torch.no_grad()
def register_keys(adapter, batches: list[EditBatch], requests: list[dict], first_edit: int,
                  progress: bool = False) -> list:
    """Add the scope's view at the key positions of ``batches`` as keys, and (``scope_anti_keys``) the anti-keys
    of the call's new edits; return each batch's bypass call (``capture.BypassCall``), which training reuses.

    A request's keys belong to its ``_edit`` id (set by apply; replayed and prefixed copies keep
    their edit's id), else to ``first_edit`` + its index. The first call also fixes the scope's
    centre (and directions), on all real tokens of its batches. ``progress``: show a bar for the relation prototypes
    when they have to be measured (once per model and layer).
    """
    scope = adapter.scope
    record = run_batches(adapter, batches, enabled=False)
    views = [call.x if call.states is None else call.states for call in record.bypass]
    anti, anti_ids, floors = anti_keys(adapter, requests, first_edit)
    if not scope.calibrated:   # on the edits' own tokens only: a centre pulled toward the anti-key prompts
        # (clozes about the subjects) brought other questions about a subject nearer its keys (docs/results.md),
        # and the chat template's own tokens (a system turn) are no edit's
        scope.calibrate(torch.cat([view[own_tokens(b, call)].float() for view, b, call
                                   in zip(views, batches, record.bypass)]))
    stops, stop_ids, seen = [], [], []   # seen: what the scope reads at each key's own position, and its edit
    for call, view, batch in zip(record.bypass, views, batches):
        rows, positions = key_positions(adapter, batch, call)
        # at a chat template token the scope reads the conversation's last token before it (routing.source)
        read = positions if call.routing.source is None else call.routing.source[rows, positions]
        readable = read >= 0
        rows, positions, read = rows[readable], positions[readable], read[readable]
        ids = torch.tensor([requests[i].get("_edit", first_edit + i) for i in batch.indices.tolist()],
                           dtype=torch.long, device=rows.device)
        kind = None if call.routing.kind is None else call.routing.kind[rows, positions]
        scope.add(view[rows, read], ids[rows], inputs=call.x[rows, positions], kind=kind)
        seen.append((view[rows, read], ids[rows]))
        if adapter.hparams.scope_stop_keys:   # the answer's last token: where the edit has said all it has to say
            last = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=rows.device)
            last.scatter_reduce_(0, batch.rows, batch.positions + 1, reduce="amax")
            kept = (last >= 0) & batch.complete   # a row cut after its first answer tokens goes on in use
            ends = adapter.template.turn_end_id if adapter.template is not None else None
            if ends is not None:   # an answer that closes the assistant's turn ends the reply: nothing follows it
                kept &= batch.input_ids[torch.arange(len(last), device=last.device), last.clamp_min(0)] != ends
            stops.append(view[kept.nonzero().flatten(), last[kept]])
            stop_ids.append(ids[kept])
    if stops:
        stop_rows = torch.cat(stops)
        scope.add_anti_keys(stop_rows, torch.cat(stop_ids), torch.full((stop_rows.shape[0],), ANY_FLOOR))
    if anti is not None:
        scope.add_anti_keys(anti, anti_ids, floors)
    if adapter.hparams.scope_anti_keys == "prototypes":
        from .prototypes import add_subject_vectors
        add_subject_vectors(adapter, requests, first_edit, progress,
                            (torch.cat([v for v, _ in seen]), torch.cat([i for _, i in seen])) if seen else None)
    return record.bypass


def own_tokens(batch: EditBatch, call) -> torch.Tensor:
    """[batch, seq] (bool): the real tokens of ``batch`` that are not the chat template's own."""
    real = batch.attention_mask.bool()
    source = call.routing.source
    if source is None:
        return real
    return real & (source == torch.arange(source.shape[-1], device=source.device))


def anti_keys(adapter, requests: list[dict], first_edit: int) -> tuple[Optional[torch.Tensor], torch.Tensor,
                                                                         torch.Tensor]:
    """The scope's view of the anti-key prompts of the call's new edits (each edit once; replayed earlier edits
    have theirs), their edit ids and floors; ``(None, ...)`` when there are none."""
    device = adapter.bypass.experts.device
    empty = (None, torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device))
    if adapter.hparams.scope_anti_keys != "relation_bank":
        return empty
    texts, ids, floors, done = [], [], [], set()
    for i, request in enumerate(requests):
        edit = request.get("_edit", first_edit + i)
        if edit < first_edit or edit in done:
            continue
        done.add(edit)
        for prompt in anti_key_prompts(request["prompt"], subject_of(adapter, request),
                                       adapter.hparams.scope_anti_relations):
            texts.append(prompt.text)
            ids.append(edit)
            floors.append(adapter.scope.copy_similarity if prompt.kind == SAME_FRAME else NO_FLOOR)
    if not texts:
        return empty
    return (scope_views(adapter, texts), torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(floors, device=device))


def subject_of(adapter, request: dict) -> Optional[str]:
    """The request's ``subject``, else the first entity the anchor extractor finds in its prompt."""
    subject = request.get("subject")
    if isinstance(subject, str) and subject.strip():
        return subject
    if adapter.extractor is None:
        return None
    found = adapter.extractor(request["prompt"])
    return found[0].text if found else None


def key_positions(adapter, batch: EditBatch, call) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the keys: the target-predicting positions (``scope_positions: targets``), or
    every position after the anchor up to the last one that predicts a target (``after_anchor``; the
    anchor's own last token is left out: every prompt naming the subject has it)."""
    if adapter.hparams.scope_positions == "targets" or call.active is None:
        return batch.rows, batch.positions
    active = call.active.bool() & batch.attention_mask.bool()
    onset = active & ~torch.nn.functional.pad(active[:, :-1], (1, 0))
    last = torch.full((active.shape[0],), -1, dtype=torch.long, device=active.device)
    last.scatter_reduce_(0, batch.rows, batch.positions, reduce="amax")
    span = torch.arange(active.shape[1], device=active.device).unsqueeze(0) <= last.unsqueeze(1)
    keep = active & span & ~onset
    keep[batch.rows, batch.positions] = True
    return keep.nonzero(as_tuple=True)
