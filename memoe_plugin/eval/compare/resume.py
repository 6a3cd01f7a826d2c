"""What results.jsonl says is done, whose settings made it, and the sequential runs' checkpoints.

:class:`Resumable` is the bookkeeping half of :class:`~.protocol.Runner`: which chunks of a run are finished,
whether a run is complete, whether its finished work was made with the settings it would run with now, and
the adapter checkpoints a crashed sequential run continues from (``--resume``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import CompareError
from .methods import METHODS
from .plan import RunSpec, chunk_ranges


class Resumable:
    """Resume and checkpoint bookkeeping over ``self.store`` (a ResultStore), for the Runner."""

    def _status(self, run: RunSpec) -> tuple[set[int], bool]:
        done, complete = set(), False
        for rec in self.store.records():
            if rec.get("run") != run.key:
                continue
            if rec["type"] == "chunk" and run.protocol == "batch":
                done.add(rec["chunk"])
            elif rec["type"] == "run_end" and rec.get("status") == "complete":
                complete = True
        return done, complete

    def check_fresh(self, runs: list[RunSpec]) -> None:
        keys = {run.key for run in runs}
        clash = sorted({rec["run"] for rec in self.store.records() if rec.get("run") in keys})
        if clash:
            raise CompareError(f"{self.store.path} already has results for {', '.join(clash)}; pass --resume "
                               "to continue them, or choose another --out")

    def _settings_digest(self, run: RunSpec) -> Optional[str]:
        """The digest of the settings ``run`` edits with now (None where the backend gives none). Continuing or
        skipping a run whose finished work (chunks, checkpoints, a complete run) was made with other settings
        (its YAML edited, another --set, a file installed by memoe-tune since) would report one experiment
        under another's settings: refused. Attempts that stopped before finishing anything do not count."""
        digest_of = getattr(self.backend, "settings_digest", None)
        if digest_of is None or METHODS[run.method].unavailable:
            return None
        try:
            digest = digest_of(run)
        except CompareError:
            raise
        except Exception:       # open_method meets it again and records it as this method's failure
            return None
        if not digest:
            return None
        records = [rec for rec in self.store.records() if rec.get("run") == run.key]
        worked = {rec.get("attempt") for rec in records
                  if rec["type"] in ("chunk", "checkpoint") or (rec["type"] == "run_end"
                                                                 and rec.get("status") == "complete")}
        before = {rec["settings_digest"] for rec in records
                  if rec["type"] == "run_start" and rec.get("attempt") in worked and rec.get("settings_digest")}
        if before - {digest}:
            raise CompareError(
                f"{self.store.path}: {run.key} has results made with other {run.method} settings (digest "
                f"{', '.join(sorted(before - {digest}))}, now {digest}): its hparams file or --set changed since. "
                f"Rerun with the settings it ran with, or use another --out")
        return digest

    def pending(self, run: RunSpec) -> Optional[list[int]]:
        """The chunks of ``run`` still to edit (batch protocol), ``[]`` when the run is complete; None for a
        sequential run that is not complete (it runs as one unit)."""
        done, complete = self._status(run)
        chunks = range(len(chunk_ranges(run.num_edits, run.batch_size)))
        if complete:
            return []
        if run.protocol == "batch":
            return [k for k in chunks if k not in done]
        return None

    def _checkpoint_folder(self, run: RunSpec) -> Optional[Path]:
        if self.checkpoint_dir is None:
            return None
        return Path(self.checkpoint_dir) / "".join(c if c.isalnum() or c in "-_.=" else "_" for c in run.key)

    def _last_checkpoint(self, run: RunSpec) -> Optional[dict]:
        """The newest checkpoint record of ``run`` whose files are all still there."""
        found = None
        for rec in self.store.records():
            if rec.get("run") == run.key and rec["type"] == "checkpoint":
                if Path(rec["adapter"]).is_file() and Path(rec["pre"]).is_file():
                    found = rec
        return found

    def _save_checkpoint(self, run: RunSpec, session, base: dict, chunk: int, pre: list[dict]) -> None:
        """The adapter after ``chunk`` (everything later chunks depend on: experts, gate, keys, edit
        list, output memory; see save_adapter) and the unedited model's scores, then one results line."""
        folder = self._checkpoint_folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        pre_path = folder / f"pre-{base['attempt']}.json"
        if not pre_path.exists():
            tmp = pre_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(pre))
            os.replace(tmp, pre_path)
        adapter = folder / f"chunk-{chunk:05d}.safetensors"
        start = time.perf_counter()
        with self._quiet():
            session.save_checkpoint(adapter)
        self.store.append({"type": "checkpoint", **base, "chunk": chunk, "adapter": str(adapter),
                           "pre": str(pre_path), "seconds": time.perf_counter() - start})
        for old in folder.glob("chunk-*.safetensors"):      # keep the newest two
            if old.name < f"chunk-{chunk - self.checkpoint_every:05d}.safetensors":
                old.unlink(missing_ok=True)

    def _resume_from(self, run: RunSpec, session, base: dict, checkpoint: dict):
        """Put the checkpointed adapter into the fresh model; copy the finished chunks' lines."""
        with self._quiet():
            edited, handle = session.load_checkpoint(Path(checkpoint["adapter"]))
        pre = json.loads(Path(checkpoint["pre"]).read_text())
        kept = [dict(rec, attempt=base["attempt"], resumed_from=rec["attempt"]) for rec in self.store.records()
                if rec.get("run") == run.key and rec.get("attempt") == checkpoint["attempt"]
                and rec["type"] in ("chunk", "case", "checkpoint") and rec.get("chunk", -1) <= checkpoint["chunk"]
                and not (rec["type"] == "case" and rec.get("final"))]
        self.store.append(*kept, {"type": "resumed", **base, "from_attempt": checkpoint["attempt"],
                                  "after_chunk": checkpoint["chunk"]})
        print(f"[memoe-compare] {run.key}: resumed after chunk {checkpoint['chunk']} from {checkpoint['adapter']}",
              file=sys.stderr)
        return edited, handle, pre, checkpoint["chunk"] + 1
