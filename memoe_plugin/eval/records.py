"""Edit requests from EasyEdit's JSON record formats, normalised to one flat shape.

Accepted record shapes (a JSON list of objects):

* flat (EasyEdit's CounterFact edit split, and our examples):
  ``prompt, target_new, subject?, ground_truth?, rephrase_prompt?, locality_prompt?, locality_ground_truth?``
* ZsRE (MEND/ROME eval format, EasyEdit's ``ZsreDataset``): ``src, alt, subject, rephrase, loc, loc_ans``
* KnowEdit: ``prompt, target_new, subject, ground_truth (list), rephrase_prompt,
  locality: {name: [{prompt, ground_truth}]}``
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

FLAT_KEYS = ("prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
             "locality_prompt", "locality_ground_truth")


def normalise_record(record: dict, index: int = 0) -> dict:
    """One record in any accepted shape -> the flat shape (missing optional keys left out)."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index}: expected a JSON object, got {type(record).__name__}")
    if "src" in record and "alt" in record:   # ZsRE
        flat = {"prompt": record["src"], "target_new": record["alt"], "subject": record.get("subject"),
                "ground_truth": _first(record.get("answers")), "rephrase_prompt": record.get("rephrase"),
                "locality_prompt": record.get("loc"), "locality_ground_truth": record.get("loc_ans")}
    elif "prompt" in record and "target_new" in record:
        flat = {key: record.get(key) for key in FLAT_KEYS}
        flat["ground_truth"] = _first(flat["ground_truth"])
        locality = record.get("locality")
        if isinstance(locality, dict) and not flat["locality_prompt"]:   # KnowEdit
            for cases in locality.values():
                if cases:
                    flat["locality_prompt"] = cases[0].get("prompt")
                    flat["locality_ground_truth"] = _first(cases[0].get("ground_truth"))
                    break
    else:
        raise ValueError(f"record {index}: needs 'prompt' and 'target_new' (or ZsRE's 'src' and 'alt'); "
                         f"it has {sorted(record)}")
    if isinstance(flat.get("locality_ground_truth"), list):
        flat["locality_ground_truth"] = _first(flat["locality_ground_truth"])
    for key in ("prompt", "target_new"):
        if not isinstance(flat[key], str) or not flat[key].strip():
            raise ValueError(f"record {index}: {key!r} must be a non-empty string, got {flat[key]!r}")
    return {key: value for key, value in flat.items() if value is not None}


def load_requests(path: Union[str, Path], limit: Optional[int] = None) -> list[dict]:
    """Read a JSON list of records (any accepted shape) into flat requests."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of edit records")
    records = records[:limit] if limit else records
    return [normalise_record(record, i) for i, record in enumerate(records)]


def easyedit_locality(requests: list[dict]) -> Optional[dict]:
    """EasyEdit's ``locality_inputs`` for requests that all have a locality prompt and answer."""
    if not all(r.get("locality_prompt") and r.get("locality_ground_truth") for r in requests):
        return None
    return {"neighborhood": {"prompt": [r["locality_prompt"] for r in requests],
                             "ground_truth": [r["locality_ground_truth"] for r in requests]}}


def _first(value):
    if isinstance(value, list):
        return value[0] if value else None
    return value


def dataset_requests(dataset: str, data_file: Optional[Union[str, Path]] = None, limit: Optional[int] = None,
                     examples_if_missing: bool = False) -> list[dict]:
    """The flat requests of a dataset's file (found as :func:`~.data.data_file` finds it).

    With ``examples_if_missing``, the built-in example edits stand in when no file is found.
    """
    from ..assets import example_edits
    from .data import DataNotFoundError, data_file as find
    try:
        path = find(dataset, data_file)
    except DataNotFoundError:
        if not examples_if_missing:
            raise
        return load_requests(example_edits(), limit)
    return load_requests(path, limit)
