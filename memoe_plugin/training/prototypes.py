"""``scope_anti_keys: prototypes``: the relation prototypes of a model's layer (built once, cached), and each new
edit's subject vector (``routing.prototypes`` has the method)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..persist.identity import config_fingerprint, tensor_sha256
from ..routing.prototypes import (CONTEXTS, RelationPrototypes, cache_path, load_prototypes, relation_effects,
                                  save_prototypes)
from ..routing.relations import CLOZE, GENERIC_SUBJECTS, OTHER_RELATION, RELATIONS, anti_key_prompts, asked_relations
from .capture import scope_views


def prototype_identity(adapter) -> dict:
    """What the prototypes depend on: the model (config and the wrapped projection's weights), where the scope reads,
    the relation bank and its generic subjects, and the chat template's own text."""
    hp = adapter.hparams
    relations = list(RELATIONS)[:hp.scope_anti_relations]
    bank = {"cloze": CLOZE, "subjects": list(GENERIC_SUBJECTS), "labels": [RELATIONS[r][0] for r in relations]}
    template = adapter.template
    return {"config_sha256": config_fingerprint(adapter.model), "weight_sha256": tensor_sha256(adapter.base_module.weight),
            "module": hp.module_name, "scope_layer": hp.scope_layer, "dtype": str(adapter.base_module.weight.dtype),
            "bank_sha256": tensor_sha256(torch.tensor(list(repr(bank).encode("utf-8")), dtype=torch.uint8)),
            "template": None if template is None else [list(f) for f in template.fragments]}


def prototypes_for(adapter, progress: bool = False) -> RelationPrototypes:
    """This model's prototypes: read from the cache (``$MEMOE_CACHE/relations``), else computed (with a progress bar
    when ``progress``) and written there."""
    identity = prototype_identity(adapter)
    path = cache_path(identity)
    if path.is_file():
        return load_prototypes(path, identity)
    prototypes = build_prototypes(adapter, identity, progress)
    try:
        save_prototypes(prototypes, path)
    except OSError as err:   # a read-only cache costs the next model load the same passes again, nothing else
        warnings.warn(f"MEMoE: could not cache the relation prototypes at {path} ({err}); they are computed anew "
                      "for each model load")
    return prototypes


@torch.no_grad()
def build_prototypes(adapter, identity: dict, progress: bool = False) -> RelationPrototypes:
    """Run the bank's cloze prompts on the generic subjects to the layer the scope reads, in plain text and (with a
    chat template) asked through it; one pass per prompt, batched, once per model and layer."""
    relations = list(RELATIONS)[:adapter.hparams.scope_anti_relations]
    texts = [CLOZE.format(label=RELATIONS[r][0], subject=s) for s in GENERIC_SUBJECTS for r in relations]
    shape = (len(GENERIC_SUBJECTS), len(relations), -1)
    label = "MEMoE: relation prototypes, once per model and layer ({})" if progress else None
    plain = scope_views(adapter, texts, progress=label and label.format("plain")).view(shape)
    others = {}
    if adapter.template is not None:
        others["chat"] = scope_views(adapter, [adapter.template.wrap(t) for t in texts], own_last=True,
                                     progress=label and label.format("chat")).view(shape)
    effects, offsets = relation_effects(plain, others)
    return RelationPrototypes(tuple(relations), CONTEXTS[:1 + len(others)], effects, offsets, identity)


@torch.no_grad()
def add_subject_vectors(adapter, requests: list[dict], first_edit: int, progress: bool = False,
                        seen: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """The subject vector of each new edit of the call (each once; replayed edits have theirs), from its first
    ``scope_anti_probes`` cloze prompts about relations it does not ask. ``seen``: what the scope read at the call's
    key positions and their edit ids (``blocks_own_keys``)."""
    from .scope_keys import subject_of
    scope, hp = adapter.scope, adapter.hparams
    if not scope.has_prototypes:
        prototypes = prototypes_for(adapter, progress)
        scope.set_prototypes(prototypes.effects, prototypes.offsets)
    order = {relation: i for i, relation in enumerate(list(RELATIONS)[:hp.scope_anti_relations])}
    texts, probes, edits, skips, done = [], [], [], [], set()
    for i, request in enumerate(requests):
        edit = request.get("_edit", first_edit + i)
        if edit < first_edit or edit in done:
            continue
        done.add(edit)
        subject = subject_of(adapter, request)
        asked = [p for p in anti_key_prompts(request["prompt"], subject, hp.scope_anti_relations)
                 if p.kind == OTHER_RELATION][:hp.scope_anti_probes]
        if not asked:
            continue
        texts += [p.text for p in asked]
        probes.append([order[p.relation] for p in asked])
        edits.append(edit)
        skip = torch.zeros(len(order), dtype=torch.bool)
        skip[[order[r] for r in asked_relations(request["prompt"], subject) if r in order]] = True
        skips.append(skip)
    if not edits:
        return
    views = scope_views(adapter, texts)
    effects = scope.proto_effects[0]
    vectors, at = [], 0
    for relations in probes:
        inputs = views[at:at + len(relations)].float()
        vectors.append((inputs - effects[torch.tensor(relations, device=effects.device)].to(inputs.device)).mean(0))
        at += len(relations)
    device = scope.center.device
    skips = [skip | blocks_own_keys(scope, vector, edit, None if seen is None else seen[0][seen[1] == edit])
             for vector, skip, edit in zip(vectors, skips, edits)]
    scope.add_subjects(torch.stack(vectors).to(device), torch.tensor(edits, dtype=torch.long, device=device),
                       torch.stack(skips).to(device))


def blocks_own_keys(scope, vector: torch.Tensor, edit: int, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """[relations] (bool): the relations whose made anti-key (in any context) would block one of the positions the
    edit was trained on (``positions``: what the scope read there), as the scope decides in use: the anti-key made
    from the subject vector as it is kept, nearer the position than the stored key it matches by more than
    ``anti_margin``. Such a relation looks, at this layer and for this subject, like the edit's own question, so the
    edit does not get it as an anti-key. (On SmolLM2 none does; on a random model, whose layer inputs hardly depend
    on the relation, most would.) The stored key is the position's view only up to its rounding: on a tiny random
    Qwen a made anti-key 0.0005 short of blocking the stored key blocked the live position."""
    keys, relations = scope.keys_of(edit), scope.proto_effects.shape[1]
    if not keys.shape[0] or positions is None or not positions.shape[0]:
        return torch.zeros(relations, dtype=torch.bool)
    made = scope.made_views(scope.kept_subject(vector), torch.zeros(relations, dtype=torch.bool))
    seen = scope.view(positions)                                                    # [positions, view]
    own = (seen @ keys.to(seen.device).t()).max(-1).values                         # the key each position matches
    sims = seen @ made.to(seen.device).t()                                          # [positions, contexts*rels]
    near = (sims > own.unsqueeze(-1) + scope.anti_margin).any(0).reshape(-1, relations).any(0)
    return near.cpu()

