"""EasyEdit's request format: which records a run edits, and the keyword arguments EasyEdit's editor takes.

The backend hands these to EasyEdit's ``_prepare_requests`` and ``batch_edit``; the protocols (``protocol.py``)
only cut them into chunks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

from ..validate import Problem
from .errors import CompareError


@dataclass
class PreparedRecords:
    """The records a run edits, WISE's irrelevant texts, and the records the check turned away."""
    edits: list[dict]
    loc_prompts: list[str]
    skipped: list[Problem]
    available: int          # usable records in the split


# What each dataset scores besides the edit prompt (its records must have them).
DATASET_NEEDS = {"zsre": ("rephrase_prompt", "locality_prompt"), "counterfact": ("rephrase_prompt", "locality_prompt"),
                 "zsre-knowedit": ("rephrase_prompt",), "counterfact-knowedit": ()}


def prepare_records(records: list[dict], num_edits: int, split: str = "all", seed: Optional[int] = None,
                    needs: Iterable[str] = (), strict: bool = False) -> PreparedRecords:
    """The ``num_edits`` records a run edits, after checking every record of the split.

    * Every record of ``split`` (``dev``/``test``/``all``, :mod:`..splits`) is checked
      (:func:`..validate.check_records`); unusable ones are skipped and listed, or, with
      ``strict``, the run stops before any edit with the list.
    * ``seed=None`` takes the first usable records in file order; a seed draws a random
      sample of them (kept in file order), so seeds vary the records as well as the methods'
      randomness.
    * Records without an unrelated locality prompt (KnowEdit's only have same-subject ones)
      get the same-subject prompt of a record *not* edited in this run: a question about
      another subject. WISE's ``loc_prompts`` come from the same unedited records.
    """
    from ..splits import select
    from ..validate import check_records, describe
    if num_edits <= 0:
        raise CompareError("--num-edits must be positive")
    indexed = [dict(r, _index=i) for i, r in enumerate(records)]
    pool = select(indexed, split)
    usable, problems = check_records(pool, needs)
    problems = [dataclasses.replace(p, index=pool[p.index]["_index"]) for p in problems]
    if strict and problems:
        raise CompareError(f"{len(problems)} of the {len(pool)} {split} records cannot be used (--strict):\n"
                           + describe(problems, None))
    good = [pool[i] for i in usable]
    if len(good) < num_edits:
        raise CompareError(f"the {split} split has {len(good)} usable records ({len(problems)} skipped); "
                           f"--num-edits asks for {num_edits}")
    if seed is None:
        chosen = list(range(num_edits))
    else:
        import random
        chosen = sorted(random.Random(seed).sample(range(len(good)), num_edits))
    picked = set(chosen)
    rest = [r for i, r in enumerate(good) if i not in picked] or good
    edits = [dict(good[i]) for i in chosen]
    unrelated = [(r["locality_prompt"], r["locality_ground_truth"]) if r.get("locality_prompt")
                 else (r["same_subject"][0] if r.get("same_subject") else None) for r in rest]
    unrelated = [u for u in unrelated if u and u[0] and u[1]]
    for k, edit in enumerate(edits):
        edit.pop("_index")
        if not edit.get("locality_prompt") and unrelated:
            edit["locality_prompt"], edit["locality_ground_truth"] = unrelated[k % len(unrelated)]
    loc = [f"{p} {a}" for p, a in unrelated] or [f"{r['prompt']} {r['target_new']}" for r in rest]
    return PreparedRecords(edits, [loc[i % len(loc)] for i in range(num_edits)], problems, len(good))


def request_kwargs(records: list[dict], loc_prompts: list[str]) -> dict:
    """Keyword arguments for EasyEdit's ``edit``/``batch_edit``/``_prepare_requests``, as its examples build them.

    ``neighborhood`` is the unrelated locality prompt; records with KnowEdit's same-subject
    prompts (``same_subject``: a list of (prompt, answer)) also get ``Relation_Specificity``,
    all of a record's prompts in one list as EasyEdit's KnowEdit runs pass them.
    """
    locality = {"neighborhood": {"prompt": [r.get("locality_prompt") for r in records],
                                 "ground_truth": [r.get("locality_ground_truth") for r in records]}}
    if any(r.get("same_subject") for r in records):
        locality["Relation_Specificity"] = {
            "prompt": [[p for p, _ in r["same_subject"]] if r.get("same_subject") else None for r in records],
            "ground_truth": [[a for _, a in r["same_subject"]] if r.get("same_subject") else None for r in records]}
    kwargs = dict(prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
                  ground_truth=[r.get("ground_truth") for r in records],
                  subject=[r["subject"] for r in records],
                  rephrase_prompts=[r.get("rephrase_prompt") for r in records],
                  locality_inputs=locality, loc_prompts=list(loc_prompts))
    kinds = list(dict.fromkeys(kind for r in records for kind in (r.get("portability") or {})))
    if kinds:     # KnowEdit's portability (Reasoning, Subject_Aliasing, ...), as EasyEdit's KnowEdit runs pass it
        def cases(r, kind, part):
            pairs = (r.get("portability") or {}).get(kind)
            return [pair[part] for pair in pairs] if pairs else None
        kwargs["portability_inputs"] = {kind: {"prompt": [cases(r, kind, 0) for r in records],
                                               "ground_truth": [cases(r, kind, 1) for r in records]}
                                        for kind in kinds}
    return kwargs


def combine_restore(first, new, callable_algs: Iterable[str], alg_name: str):
    """One restore handle for several apply calls on the same model.

    EasyEdit returns, per call, either a callable (GRACE, WISE, MEMoE, ...) or a
    dict of the original tensors it changed (FT, ROME, MEMIT, ...). The first
    callable restores the model as it was before the first call (later GRACE calls
    even return one that cannot restore), and for dicts the first copy of each
    tensor is the original. PEFT methods restore with ``edited_model.unload()``.
    """
    if first is None:
        return new
    if alg_name in set(callable_algs) or callable(first):
        return first
    if isinstance(first, dict) and isinstance(new, dict):
        merged = dict(new)
        merged.update(first)
        return merged
    return first
