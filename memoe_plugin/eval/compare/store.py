"""Results as append-only JSON lines, fsynced as they are written (a crash loses at most one chunk)."""
from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS_FILE = "results.jsonl"


def _jsonable(value):
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:   # pragma: no cover
        pass
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


class ResultStore:
    """Append-only JSON lines; every write is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with self.path.open() as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut by a crash: skip it
                    continue
        return out

    def append(self, *records: dict) -> None:
        text = "".join(json.dumps(record, default=_jsonable) + "\n" for record in records)
        with self.path.open("a") as handle:
            handle.write(text)                  # one write: the records land together, or (crash) cut at the end
            handle.flush()
            os.fsync(handle.fileno())
