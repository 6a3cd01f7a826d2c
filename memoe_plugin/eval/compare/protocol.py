"""The paper's protocols, run on any backend: batch editing (chunks rolled back) and sequential editing.

* ``batch`` (paper Table 1): the edits are cut into chunks of ``--batch-size`` (30). For a
  method EasyEdit can batch (MEMoE, FT, LoRA, MEMIT, ...) one ``batch_edit(chunk,
  sequential_edit=False)`` call edits, scores and rolls back each chunk. A method EasyEdit
  edits one request at a time (GRACE, WISE, ROME, ...) gets the chunk's edits one after
  another on the same model, then the chunk is scored, then rolled back. After every chunk
  the model's ``state_dict`` is hashed and compared with the unedited model's.
* ``sequential``: chunks of ``--batch-size`` (10) are applied one after another with no
  rollback; every edit is scored after the last chunk (as the paper), against "pre" scores
  taken on the unedited model. ``eval_every_step`` also scores all edits so far after every
  chunk.

The backend (``easyedit_backend`` for real runs, fakes in the tests) opens one session per
method; the :class:`Runner` only decides what runs in which order and writes the results
to a :class:`~.store.ResultStore` as they come.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import math
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

from ..metrics import mean_post
from ..state import state_fingerprint
from .errors import CompareError, MethodUnavailable, RollbackError
from .methods import METHODS
from .store import ResultStore

DEFAULT_BATCH_SIZE = {"batch": 30, "sequential": 10}


def split_records(records: list[dict], num_edits: int) -> tuple[list[dict], list[str]]:
    """First ``num_edits`` records to edit, and one irrelevant text per edit for WISE's ``loc_prompts``.

    The texts are the locality prompt + answer of the records *after* the edited ones
    (EasyEdit's WISE example takes them from the ZsRE train split), cycling if short.
    """
    if num_edits <= 0:
        raise CompareError("--num-edits must be positive")
    edits = records[:num_edits]
    if len(edits) < num_edits:
        raise CompareError(f"the data file has {len(records)} usable records; --num-edits asks for {num_edits}")
    rest = records[num_edits:] or records
    loc = [f"{r['locality_prompt']} {r['locality_ground_truth']}" for r in rest]
    return edits, [loc[i % len(loc)] for i in range(num_edits)]


def request_kwargs(records: list[dict], loc_prompts: list[str]) -> dict:
    """Keyword arguments for EasyEdit's ``edit``/``batch_edit``/``_prepare_requests``, as its examples build them."""
    return dict(prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
                ground_truth=[r.get("ground_truth") for r in records],
                subject=[r["subject"] for r in records],
                rephrase_prompts=[r["rephrase_prompt"] for r in records],
                locality_inputs={"neighborhood": {"prompt": [r["locality_prompt"] for r in records],
                                                  "ground_truth": [r["locality_ground_truth"] for r in records]}},
                loc_prompts=list(loc_prompts))


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    if size <= 0:
        raise CompareError("--batch-size must be positive")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


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


@dataclass
class RunSpec:
    dataset: str
    method: str
    protocol: str
    batch_size: int
    num_edits: int
    eval_every_step: bool = False

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.protocol}|bs={self.batch_size}|n={self.num_edits}|{self.method}"


PROTOCOL_NOTES = {
    ("batch", True): "EasyEdit batch_edit per chunk (edit, score, roll back)",
    ("batch", False): "not batchable in EasyEdit: the chunk's edits applied one after another, "
                      "then the chunk scored, then rolled back",
    ("sequential", True): "chunks applied one after another, no rollback; all scored after the last",
    ("sequential", False): "edits applied one at a time (not batchable), no rollback; all scored after the last",
}


class Runner:
    """Runs RunSpecs on a backend, writing to a ResultStore. Backend-agnostic (tests use fakes)."""

    def __init__(self, backend, store: ResultStore, resume: bool = False, progress: bool = True,
                 log: Optional[io.TextIOBase] = None):
        self.backend, self.store, self.resume, self.progress, self.log = backend, store, resume, progress, log
        self.current_chunk: Optional[int] = None

    # ---------------------------------------------------------------- helpers
    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=True, dynamic_ncols=True,
                    file=sys.stderr)

    @contextlib.contextmanager
    def _quiet(self):
        """EasyEdit prints a lot to stdout: send it to the log file, keep tqdm (stderr) on screen."""
        if self.log is None:
            yield
            return
        with contextlib.redirect_stdout(self.log):
            yield
        self.log.flush()

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

    # ---------------------------------------------------------------- main loop
    def run_all(self, runs: list[RunSpec]) -> None:
        if not self.resume:
            self.check_fresh(runs)
        for run in runs:
            self.run_one(run)

    def run_one(self, run: RunSpec) -> None:
        done, complete = self._status(run)
        n_chunks = len(chunk_ranges(run.num_edits, run.batch_size))
        if complete or (run.protocol == "batch" and len(done) >= n_chunks):
            print(f"[memoe-compare] {run.key}: already complete, skipped", file=sys.stderr)
            return
        base = {"run": run.key, "attempt": uuid.uuid4().hex[:12]}
        spec = METHODS[run.method]
        self.store.append({"type": "run_start", **base, **dataclasses.asdict(run), "alg_name": spec.alg_name,
                           "time": datetime.datetime.now().isoformat(timespec="seconds")})
        self.current_chunk = None
        session = None
        try:
            if spec.unavailable:
                raise MethodUnavailable(spec.unavailable)
            with self._quiet():
                session = self.backend.open_method(run)
            self.store.append({"type": "run_info", **base, "batchable": session.batchable,
                               "hparams": session.describe(),
                               "note": PROTOCOL_NOTES[(run.protocol, session.batchable)]})
            if run.protocol == "batch":
                self._batch(run, session, done, base)
            else:
                self._sequential(run, session, base)
            self.store.append({"type": "run_end", **base, "status": "complete"})
        except KeyboardInterrupt:
            self.store.append({"type": "run_end", **base, "status": "interrupted", "chunk": self.current_chunk})
            raise
        except MethodUnavailable as err:
            self.store.append({"type": "error", **base, "kind": "unavailable", "chunk": None, "error": str(err)})
            print(f"[memoe-compare] {run.key}: unavailable: {err}", file=sys.stderr)
        except Exception as err:  # one method failing must not stop the others
            self.store.append({"type": "error", **base, "kind": "error", "chunk": self.current_chunk,
                               "error": f"{type(err).__name__}: {err}",
                               "traceback": traceback.format_exc(limit=30)})
            where = "" if self.current_chunk is None else f" in chunk {self.current_chunk}"
            print(f"[memoe-compare] {run.key}: failed{where}: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()

    # ---------------------------------------------------------------- batch protocol
    def _batch(self, run: RunSpec, session, done: set[int], base: dict) -> None:
        ranges = chunk_ranges(run.num_edits, run.batch_size)
        records, loc_prompts = session.records
        baseline = state_fingerprint(session.model)
        bar = self._bar(len(ranges), f"{run.dataset} {run.method} batch")
        bar.update(len([k for k in done if k < len(ranges)]))
        try:
            for k, (lo, hi) in enumerate(ranges):
                if k in done:
                    continue
                self.current_chunk = k
                kwargs = request_kwargs(records[lo:hi], loc_prompts[lo:hi])
                start = time.perf_counter()
                with self._quiet():
                    if session.batchable:
                        metrics = session.batch_edit(kwargs)
                        edit_seconds = float(metrics[0].get("time", math.nan)) if metrics else 0.0
                    else:
                        metrics, edit_seconds = self._one_by_one_chunk(session, kwargs)
                wall = time.perf_counter() - start
                fingerprint = state_fingerprint(session.model)
                exact = fingerprint == baseline
                cases = [{"type": "case", **base, "chunk": k, "index": lo + i,
                          "record_id": records[lo + i].get("case_id", lo + i), "final": True,
                          "metric": metric} for i, metric in enumerate(metrics)]
                self.store.append(*cases, {"type": "chunk", **base, "chunk": k, "range": [lo, hi],
                                           "edit_seconds": edit_seconds, "wall_seconds": wall,
                                           "rollback_exact": exact})
                bar.set_postfix(rel=f"{mean_post(metrics, 'rewrite_acc'):.2f}", rollback="exact" if exact else "DIFF")
                bar.update(1)
                if not exact:
                    raise RollbackError(f"after chunk {k} the model's state_dict differs from the unedited model "
                                        "(EasyEdit's restore did not undo the edit); later chunks would start "
                                        "from an edited model, so this method stops here")
        finally:
            bar.close()

    def _one_by_one_chunk(self, session, kwargs: dict) -> tuple[list[dict], float]:
        """A chunk for a method EasyEdit edits one request at a time: all edits, then scores, then rollback."""
        requests = session.prepare(kwargs)
        metrics = [{"case_id": i, "requested_rewrite": r, "pre": session.evaluate(session.model, r)}
                   for i, r in enumerate(requests)]
        edited, handle, seconds = session.apply(requests, None)
        for metric, request in zip(metrics, requests):
            metric["time"] = seconds
            metric["post"] = session.evaluate(edited, request)
        session.restore(edited, handle)
        for metric, request in zip(metrics, requests):
            session.finalize(metric, request)
        return metrics, seconds

    # ---------------------------------------------------------------- sequential protocol
    def _sequential(self, run: RunSpec, session, base: dict) -> None:
        ranges = chunk_ranges(run.num_edits, run.batch_size)
        records, loc_prompts = session.records
        baseline = state_fingerprint(session.model)
        with self._quiet():
            requests = session.prepare(request_kwargs(records, loc_prompts))
        bar = self._bar(len(requests) + len(ranges) + len(requests), f"{run.dataset} {run.method} sequential")
        try:
            pre = []
            for request in requests:          # "pre" on the unedited model, for every edit
                with self._quiet():
                    pre.append(session.evaluate(session.model, request))
                bar.update(1)
            edited, handle = None, None
            for k, (lo, hi) in enumerate(ranges):
                self.current_chunk = k
                with self._quiet():
                    edited, handle, seconds = session.apply(requests[lo:hi], handle)
                self.store.append({"type": "chunk", **base, "chunk": k, "range": [lo, hi], "edit_seconds": seconds,
                                   "rollback_exact": None})
                bar.update(1)
                if run.eval_every_step and k < len(ranges) - 1:
                    step = self._score(session, edited, requests[:hi], pre[:hi], records, base, k, final=False)
                    self.store.append(*step)
            final = []
            for i, request in enumerate(requests):
                with self._quiet():
                    final.append({"case_id": i, "requested_rewrite": request, "pre": pre[i],
                                  "post": session.evaluate(edited, request)})
                bar.update(1)
            with self._quiet():
                session.restore(edited, handle)
                for metric, request in zip(final, requests):
                    session.finalize(metric, request)
            exact = state_fingerprint(session.model) == baseline
            self.store.append(*[{"type": "case", **base, "chunk": len(ranges) - 1, "step": len(ranges) - 1,
                                 "index": i, "record_id": records[i].get("case_id", i), "final": True,
                                 "metric": metric} for i, metric in enumerate(final)],
                              {"type": "restore", **base, "rollback_exact": exact})
        finally:
            bar.close()

    def _score(self, session, edited, requests, pre, records, base, step, final):
        out = []
        with self._quiet():
            for i, request in enumerate(requests):
                metric = {"case_id": i, "requested_rewrite": request, "pre": pre[i],
                          "post": session.evaluate(edited, request)}
                session.finalize(metric, request)
                out.append({"type": "case", **base, "chunk": step, "step": step, "index": i,
                            "record_id": records[i].get("case_id", i), "final": final, "metric": metric})
        return out
