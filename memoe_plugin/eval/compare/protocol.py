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
from pathlib import Path
from typing import Iterable, Optional

from ..metrics import mean_post
from ..state import state_fingerprint
from ..validate import describe
from .errors import CompareError, MethodUnavailable, RollbackError
from .methods import METHODS
from .plan import PROTOCOL_NOTES, RunSpec, chunk_ranges
from .requests import request_kwargs
from .resume import Resumable
from .store import ResultStore

class Runner(Resumable):
    """Runs RunSpecs on a backend, writing to a ResultStore. Backend-agnostic (tests use fakes)."""

    def __init__(self, backend, store: ResultStore, resume: bool = False, progress: bool = True,
                 log: Optional[io.TextIOBase] = None, checkpoint_every: int = 0,
                 checkpoint_dir: Optional[Path] = None, generation: bool = False,
                 probe_items: Optional[list] = None, probe_chunks: int = 1, wild: bool = False,
                 fluency: bool = False, chat: bool = False):
        self.backend, self.store, self.resume, self.progress, self.log = backend, store, resume, progress, log
        self.checkpoint_every, self.checkpoint_dir = checkpoint_every, checkpoint_dir
        # Extra scores on the edited model, before its rollback: greedy generation for every edit
        # (generation.py), and the general-ability probes (probes.py) after the first probe_chunks chunks.
        self.generation, self.probe_items, self.probe_chunks = generation, probe_items, probe_chunks
        self.wild = wild   # also WILD-style answers: natural stop, with and without an instruction (generation.py)
        self.fluency = fluency   # n-gram entropy and perplexity on neutral text (fluency.py), when the probes run
        self.chat = chat         # replies through the tokenizer's chat template (generation.chat_scores)
        self.current_chunk: Optional[int] = None

    # ---------------------------------------------------------------- helpers
    @property
    def _generates(self) -> bool:
        return self.generation or self.wild or self.chat

    def _generated(self, session, model, request: dict, before: Optional[dict] = None) -> dict:
        """The generation-based scores of one edit on ``model``: greedy answers with the target's token budget
        (``generation``), WILD-style answers (``wild``) and replies through the chat template (``chat``; ``before``:
        the unedited model's replies)."""
        scores = session.generation_scores(model, request) if self.generation else {}
        if self.wild:
            scores.update(session.wild_scores(model, request))
        if self.chat:
            scores.update(session.chat_scores(model, request, before))
        return scores

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

    # ---------------------------------------------------------------- main loop
    def run_all(self, runs: list[RunSpec]) -> None:
        if not self.resume:
            self.check_fresh(runs)
        for run in runs:
            self.run_one(run)

    def run_one(self, run: RunSpec, only_chunks: Optional[Iterable[int]] = None) -> None:
        """Run ``run`` (what is left of it); ``only_chunks``: just these chunks of a batch-protocol run, as one
        unit of a distributed comparison (``distributed.py``), which then does not mark the run complete."""
        digest = self._settings_digest(run)
        done, complete = self._status(run)
        n_chunks = len(chunk_ranges(run.num_edits, run.batch_size))
        if complete or (run.protocol == "batch" and len(done) >= n_chunks):
            print(f"[memoe-compare] {run.key}: already complete, skipped", file=sys.stderr)
            return
        if only_chunks is not None:
            if run.protocol != "batch":
                raise CompareError("only the batch protocol's chunks are independent units of work")
            wanted = set(only_chunks)
            done = done | {k for k in range(n_chunks) if k not in wanted}
        base = {"run": run.key, "attempt": uuid.uuid4().hex[:12]}
        spec = METHODS[run.method]
        self.store.append({"type": "run_start", **base, **dataclasses.asdict(run), "alg_name": spec.alg_name,
                           "time": datetime.datetime.now().isoformat(timespec="seconds"),
                           **({"settings_digest": digest} if digest else {})})
        self.current_chunk = None
        session = None
        try:
            if spec.unavailable:
                raise MethodUnavailable(spec.unavailable)
            with self._quiet():
                session = self.backend.open_method(run)
            skipped = list(getattr(session, "skipped", []))
            self.store.append({"type": "run_info", **base, "batchable": session.batchable,
                               "hparams": session.describe(), "skipped_records": len(skipped),
                               "note": PROTOCOL_NOTES[(run.protocol, session.batchable)]})
            if skipped:
                self.store.append(*[{"type": "skipped", **base, "index": p.index, "record_id": p.record_id,
                                     "reason": p.reason} for p in skipped])
                print(f"[memoe-compare] {run.key}: {len(skipped)} records cannot be used and are skipped "
                      f"(--strict stops instead):\n" + describe(skipped), file=sys.stderr)
            if run.protocol == "batch":
                self._batch(run, session, done, base)
            else:
                self._sequential(run, session, base)
            if only_chunks is None:
                self.store.append({"type": "run_end", **base, "status": "complete"})
            else:          # the run is complete once every chunk is (report.summarise counts them)
                self.store.append({"type": "run_end", **base, "status": "chunks_done", "chunks": sorted(wanted)})
        except KeyboardInterrupt:
            self.store.append({"type": "run_end", **base, "status": "interrupted", "chunk": self.current_chunk})
            raise
        except CompareError:     # a usage problem (bad records under --strict, ...): stop the whole run
            self.store.append({"type": "run_end", **base, "status": "stopped"})
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
        if self._general and any(k not in done for k in range(min(self.probe_chunks, len(ranges)))):
            self._probe(session, base, None, "before")
        try:
            for k, (lo, hi) in enumerate(ranges):
                if k in done:
                    continue
                self.current_chunk = k
                kwargs = request_kwargs(records[lo:hi], loc_prompts[lo:hi])
                probe = self._general and k < self.probe_chunks
                start = time.perf_counter()
                with self._quiet():
                    if session.batchable and not (self._generates or probe):
                        metrics = session.batch_edit(kwargs)
                        edit_seconds = float(metrics[0].get("time", math.nan)) if metrics else 0.0
                    else:
                        metrics, edit_seconds = self._composed_chunk(session, kwargs, base, k, probe)
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

    def _composed_chunk(self, session, kwargs: dict, base: dict, chunk: int, probe: bool = False):
        """One chunk as EasyEdit's batch_edit runs it (pre scores, apply, post scores, restore, finalize),
        from the same EasyEdit functions, with the extra scores taken on the edited model before its
        rollback. Methods EasyEdit edits one request at a time get the chunk's edits one after another."""
        requests = session.prepare(kwargs)
        metrics = [{"case_id": i, "requested_rewrite": r, "pre": session.evaluate(session.model, r)}
                   for i, r in enumerate(requests)]
        if self.generation:       # the unedited model's greedy answers: what exact match gains by the edit
            for metric, request in zip(metrics, requests):
                metric["pre_generation"] = session.generation_scores(session.model, request)
        if self.chat:             # the unedited model's chat replies: what "unchanged" compares with
            for metric, request in zip(metrics, requests):
                metric["pre_chat"] = session.chat_scores(session.model, request)
        edited, handle, seconds = session.apply(requests, None)
        for metric, request in zip(metrics, requests):
            metric["time"] = seconds
            metric["post"] = session.evaluate(edited, request)
            if self._generates:
                metric["generation"] = self._generated(session, edited, request, metric.get("pre_chat"))
        if probe:
            self._probe(session, base, chunk, "after", edited)
        session.restore(edited, handle)
        for metric, request in zip(metrics, requests):
            session.finalize(metric, request)
        return metrics, seconds

    @property
    def _general(self) -> bool:
        """Whether general ability is scored (the probes, fluency or both) before and after edits."""
        return bool(self.probe_items) or self.fluency

    def _probe(self, session, base: dict, chunk: Optional[int], stage: str, model=None) -> None:
        """Score general ability on ``model``: one ``probe`` record (the probes) and one ``fluency`` record."""
        model = session.model if model is None else model
        scorers = [("probe", lambda: {"tasks": session.probe(model, self.probe_items)})] if self.probe_items else []
        if self.fluency:
            scorers.append(("fluency", lambda: session.fluency(model)))
        for kind, score in scorers:
            start = time.perf_counter()
            with self._quiet():
                scores = score()
            self.store.append({"type": kind, **base, "chunk": chunk, "stage": stage, **scores,
                               "seconds": time.perf_counter() - start})

    # ---------------------------------------------------------------- sequential checkpoints
    # ---------------------------------------------------------------- sequential protocol
    def _sequential(self, run: RunSpec, session, base: dict) -> None:
        ranges = chunk_ranges(run.num_edits, run.batch_size)
        records, loc_prompts = session.records
        baseline = state_fingerprint(session.model)
        with self._quiet():
            requests = session.prepare(request_kwargs(records, loc_prompts))
        can_checkpoint = bool(getattr(session, "can_checkpoint", False)) and self._checkpoint_folder(run) is not None
        checkpoint = self._last_checkpoint(run) if self.resume and can_checkpoint else None
        bar = self._bar(len(requests) + len(ranges) + len(requests), f"{run.dataset} {run.method} sequential")
        try:
            edited, handle, first = None, None, 0
            if self._general:
                self._probe(session, base, None, "before")
            if checkpoint is not None:
                edited, handle, pre, first = self._resume_from(run, session, base, checkpoint)
                bar.update(len(requests) + first)
            else:
                pre = []
                for request in requests:          # "pre" on the unedited model, for every edit
                    with self._quiet():
                        pre.append(session.evaluate(session.model, request))
                        if self.chat:             # kept with "pre", so that a resumed run has it too
                            pre[-1]["chat"] = session.chat_scores(session.model, request)
                    bar.update(1)
            for k, (lo, hi) in enumerate(ranges):
                if k < first:
                    continue
                self.current_chunk = k
                with self._quiet():
                    edited, handle, seconds = session.apply(requests[lo:hi], handle)
                self.store.append({"type": "chunk", **base, "chunk": k, "range": [lo, hi], "edit_seconds": seconds,
                                   "rollback_exact": None})
                bar.update(1)
                if run.eval_every_step and k < len(ranges) - 1:
                    step = self._score(session, edited, requests[:hi], pre[:hi], records, base, k, final=False)
                    self.store.append(*step)
                if (can_checkpoint and self.checkpoint_every and (k + 1) % self.checkpoint_every == 0
                        and k < len(ranges) - 1):
                    self._save_checkpoint(run, session, base, k, pre)
            final = []
            for i, request in enumerate(requests):
                with self._quiet():
                    final.append({"case_id": i, "requested_rewrite": request, "pre": pre[i],
                                  "post": session.evaluate(edited, request)})
                    if self._generates:
                        final[-1]["generation"] = self._generated(session, edited, request,
                                                                  pre[i].get("chat") if self.chat else None)
                bar.update(1)
            if self._general:
                self._probe(session, base, len(ranges) - 1, "after", edited)
            with self._quiet():
                session.restore(edited, handle)
                for metric, request in zip(final, requests):
                    session.finalize(metric, request)
            exact = state_fingerprint(session.model) == baseline
            if self.generation and exact:   # the unedited model again (also after a resume): its greedy answers
                with self._quiet():
                    for metric, request in zip(final, requests):
                        metric["pre_generation"] = session.generation_scores(session.model, request)
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
