"""What a comparison runs: one RunSpec per dataset x method x protocol x batch size x seed, and its chunks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import CompareError

DEFAULT_BATCH_SIZE = {"batch": 30, "sequential": 10}


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    if size <= 0:
        raise CompareError("--batch-size must be positive")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class RunSpec:
    dataset: str
    method: str
    protocol: str
    batch_size: int
    num_edits: int
    eval_every_step: bool = False
    split: str = "all"
    seed: Optional[int] = None

    @property
    def key(self) -> str:
        """The run's name in results.jsonl (:func:`parse_key` reads it back)."""
        key = f"{self.dataset}|{self.protocol}|bs={self.batch_size}|n={self.num_edits}|{self.method}"
        if self.split != "all":
            key += f"|split={self.split}"
        if self.seed is not None:
            key += f"|seed={self.seed}"
        return key


PROTOCOL_NOTES = {
    ("batch", True): "EasyEdit batch_edit per chunk (edit, score, roll back)",
    ("batch", False): "not batchable in EasyEdit: the chunk's edits applied one after another, "
                      "then the chunk scored, then rolled back",
    ("sequential", True): "chunks applied one after another, no rollback; all scored after the last",
    ("sequential", False): "edits applied one at a time (not batchable), no rollback; all scored after the last",
}


def parse_key(key: str) -> dict:
    """The fields of a :attr:`RunSpec.key`, typed (what the report groups by)."""
    parts = key.split("|")
    dataset, protocol, bs, n, method = (parts + [""] * 5)[:5]
    extra = dict(p.split("=", 1) for p in parts[5:] if "=" in p)
    return {"dataset": dataset, "protocol": protocol,
            "batch_size": int(bs.split("=")[1]) if "=" in bs else None,
            "num_edits": int(n.split("=")[1]) if "=" in n else None, "method": method,
            "split": extra.get("split", "all"), "seed": int(extra["seed"]) if "seed" in extra else None}
