"""Relation prototypes: what the other relations of a subject look like at the adapted layer, paid once per model.

The key scope's anti-keys keep another question about an edited subject out of the edit ("The gender of S is"
after editing "The occupation of S is"). Kept per edit (``scope_anti_keys: relation_bank``), they cost about 80
short forward passes and about 90 stored inputs per edit, and each edit pays again for what every edit shares:
how the bank's relations move the layer input. ``scope_anti_keys: prototypes`` pays for that once.

At the layer the scope reads, the input at the last token of "The {relation} of {subject} is" is close to a sum

    x(subject, relation) ~ g(subject) + h(relation)

:func:`relation_effects` estimates ``h`` for each relation of the bank as the mean over generic subjects (written
for this project, :data:`..relations.GENERIC_SUBJECTS`) less the mean over all relations, once per model and
layer, in each context the scope reads: plain text and, with a chat template, the question asked through it
(``offsets``: how the context moves every input). Each edit then needs one vector, its subject's
``g = mean_k (x(subject, r_k) - h(r_k))`` over ``scope_anti_probes`` probe prompts, and its anti-keys are
``g + h(r) + offset(context)`` for every other relation, made when a position is compared and never stored.
On the dev split these put as few of wiki_counterfact's same-subject questions in scope as the stored anti-keys
did, at 4 forward passes instead of about 80 per edit (docs/results.md, "One scope for every mode").

:class:`RelationPrototypes` is the shared part; :func:`load_prototypes` / :func:`save_prototypes` keep it on disk,
named and checked by the identity of the model and layer it was computed on, so that a file computed on another
model or layer is never used.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

FORMAT = "memoe-relation-prototypes/1"
CONTEXTS = ("plain", "chat")


@dataclass
class RelationPrototypes:
    """``effects`` [contexts, relations, dim]: each relation's effect on the layer input; ``offsets`` [contexts, dim]:
    each context's shift from plain text; ``relations``: the bank's relation names, in the order of ``effects``."""
    relations: tuple[str, ...]
    contexts: tuple[str, ...]
    effects: torch.Tensor
    offsets: torch.Tensor
    identity: dict


def relation_effects(plain: torch.Tensor, others: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(effects, offsets)`` from the inputs [subjects, relations, dim] of the cloze prompts in plain text and in
    each other context: per context the mean over subjects less the mean over all, and its mean less plain's."""
    grand = plain.float().mean((0, 1))
    effects, offsets = [plain.float().mean(0) - grand], [torch.zeros_like(grand)]
    for inputs in others.values():
        mean = inputs.float().mean((0, 1))
        effects.append(inputs.float().mean(0) - mean)
        offsets.append(mean - grand)
    return torch.stack(effects), torch.stack(offsets)


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def cache_path(identity: dict, folder: Optional[Path] = None) -> Path:
    """Where the prototypes of ``identity`` are kept: ``$MEMOE_CACHE/relations/<digest>.safetensors``."""
    from ..paths import cache_dir
    return (folder or cache_dir() / "relations") / f"{digest(identity)}.safetensors"


def save_prototypes(prototypes: RelationPrototypes, path: Path) -> None:
    """Write atomically (a temporary file, then ``os.replace``)."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "identity": json.dumps(prototypes.identity, sort_keys=True),
            "relations": json.dumps(list(prototypes.relations)), "contexts": json.dumps(list(prototypes.contexts))}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"effects": prototypes.effects.detach().cpu().contiguous(),
               "offsets": prototypes.offsets.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_prototypes(path: Path, identity: dict) -> RelationPrototypes:
    """Read prototypes saved for ``identity``; ``ValueError`` naming what differs when they were computed on another
    model, layer, relation bank or template, or when the file is not a prototypes file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:   # noqa: BLE001 - safetensors raises its own error types for malformed files
        raise ValueError(f"{path} is not a readable relation-prototypes file ({type(err).__name__}: {err}); delete it "
                         "and it is computed again") from None
    if meta.get("format") != FORMAT or "effects" not in tensors or "offsets" not in tensors:
        raise ValueError(f"{path} is not a MEMoE relation-prototypes file (format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}); delete it and it is computed again")
    saved = json.loads(meta["identity"])
    differs = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differs:
        raise ValueError(f"{path} holds relation prototypes of another model or layer ({', '.join(differs)} differ): "
                         "they describe that model's layer input, not this one's. Use the file computed for this "
                         "model and layer (delete it and it is computed again)")
    return RelationPrototypes(tuple(json.loads(meta["relations"])), tuple(json.loads(meta["contexts"])),
                              tensors["effects"], tensors["offsets"], saved)
