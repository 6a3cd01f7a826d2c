"""The dev/test split of every data file: tune on dev, report on test.

A record's split is a function of its edit prompt alone (a hash), so it does not depend on the
file's order or size, a record keeps its split in every file that holds it (ZsRE's MEND and
KnowEdit files share most prompts), and records never seen before split the same way
everywhere. One record in five is dev.
"""
from __future__ import annotations

import hashlib

SPLITS = ("dev", "test", "all")
DEV_SHARE = 5          # one record in DEV_SHARE is dev


def prompt_of(record: dict) -> str:
    """The edit prompt of a record in any of EasyEdit's formats (flat, ZsRE ``src``, KnowEdit)."""
    prompt = record.get("prompt", record.get("src"))
    if not isinstance(prompt, str):
        raise ValueError(f"record has no edit prompt ('prompt' or 'src'): keys {sorted(record)}")
    return prompt


def split_of(record: dict) -> str:
    """``"dev"`` or ``"test"``."""
    digest = hashlib.sha256(" ".join(prompt_of(record).split()).encode("utf-8")).digest()
    return "dev" if int.from_bytes(digest[:8], "big") % DEV_SHARE == 0 else "test"


def select(records: list, split: str) -> list:
    """The records of one split, in file order (``"all"``: every record)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    return list(records) if split == "all" else [r for r in records if split_of(r) == split]
