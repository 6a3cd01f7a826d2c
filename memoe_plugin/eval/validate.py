"""Check edit records before the first edit: which ones a run can use, and why the others cannot.

A long run that meets a bad record in its 53rd batch loses everything edited so far
(EasyEdit asserts, MEMoE raises). :func:`check_records` looks at every record first and
names each unusable one with its index and the reason, so the run can skip them (or,
with ``strict``, stop before anything is edited).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Problem:
    index: int          # position in the data file
    record_id: object   # the record's own id (case_id) when it has one
    reason: str

    def __str__(self) -> str:
        return f"record {self.index} (id {self.record_id}): {self.reason}"


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def record_problems(record: dict, needs: Iterable[str] = ()) -> list[str]:
    """Why ``record`` (a flat record as :func:`~.compare.easyedit_backend.load_records` gives) cannot be edited.

    ``needs``: further keys the run scores (``rephrase_prompt``, ``locality_prompt``); each must be a
    non-empty string. An empty list means the record is usable.
    """
    reasons = []
    for key in ("prompt", "target_new", "subject"):
        if not _text(record.get(key)):
            reasons.append(f"{key!r} is missing, empty or not a string ({record.get(key)!r})")
    if not reasons and record["subject"] not in record["prompt"]:
        reasons.append(f"subject {record['subject']!r} does not occur in the prompt {record['prompt']!r} "
                       "(EasyEdit asserts it does; MEMIT/ROME locate the subject's tokens in the prompt)")
    for key in needs:
        if not _text(record.get(key)):
            reasons.append(f"{key!r} is missing or empty, and this run scores it")
    if "locality_prompt" in needs and not _text(record.get("locality_ground_truth")):
        reasons.append("'locality_ground_truth' is missing or empty")
    return reasons


def check_records(records: list[dict], needs: Iterable[str] = ()) -> tuple[list[int], list[Problem]]:
    """Indices of the usable records, and a :class:`Problem` for every other one.

    Besides :func:`record_problems`, a record whose prompt repeats an earlier usable record's is
    unusable: with another target the two edits contradict each other, with the same target it
    is the same edit twice, and either way it skews the scores of a sequential run.
    """
    needs = tuple(needs)
    usable, problems, seen = [], [], {}
    for index, record in enumerate(records):
        record_id = record.get("case_id", index)
        reasons = record_problems(record, needs)
        prompt = record.get("prompt")
        if not reasons and prompt.strip() in seen:
            first = seen[prompt.strip()]
            same = records[first]["target_new"] == record["target_new"]
            reasons.append(f"its prompt repeats record {first}'s" + (" with the same target (a duplicate)" if same
                                                                     else f" with another target "
                                                                          f"({records[first]['target_new']!r})"))
        if reasons:
            problems.append(Problem(index, record_id, "; ".join(reasons)))
        else:
            seen[prompt.strip()] = index
            usable.append(index)
    return usable, problems


def describe(problems: list[Problem], limit: Optional[int] = 20) -> str:
    """The problems as lines, at most ``limit`` of them and a count of the rest."""
    lines = [str(p) for p in problems[:limit]]
    if limit is not None and len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)
