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
import json
import math
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..metrics import mean_post
from ..state import state_fingerprint
from ..validate import Problem, describe
from .errors import CompareError, MethodUnavailable, RollbackError
from .methods import METHODS
from .store import ResultStore

DEFAULT_BATCH_SIZE = {"batch": 30, "sequential": 10}


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
    split: str = "all"
    seed: Optional[int] = None

    @property
    def key(self) -> str:
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


class Runner:
    """Runs RunSpecs on a backend, writing to a ResultStore. Backend-agnostic (tests use fakes)."""

    def __init__(self, backend, store: ResultStore, resume: bool = False, progress: bool = True,
                 log: Optional[io.TextIOBase] = None, checkpoint_every: int = 0,
                 checkpoint_dir: Optional[Path] = None, generation: bool = False,
                 probe_items: Optional[list] = None, probe_chunks: int = 1, wild: bool = False):
        self.backend, self.store, self.resume, self.progress, self.log = backend, store, resume, progress, log
        self.checkpoint_every, self.checkpoint_dir = checkpoint_every, checkpoint_dir
        # Extra scores on the edited model, before its rollback: greedy generation for every edit
        # (generation.py), and the general-ability probes (probes.py) after the first probe_chunks chunks.
        self.generation, self.probe_items, self.probe_chunks = generation, probe_items, probe_chunks
        self.wild = wild   # also WILD-style answers: natural stop, with and without an instruction (generation.py)
        self.current_chunk: Optional[int] = None

    # ---------------------------------------------------------------- helpers
    def _generated(self, session, model, request: dict) -> dict:
        """The generation-based scores of one edit on ``model``: greedy answers with the target's token budget
        (``generation``) and WILD-style answers (``wild``)."""
        scores = session.generation_scores(model, request) if self.generation else {}
        if self.wild:
            scores.update(session.wild_scores(model, request))
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
        if self.probe_items and any(k not in done for k in range(min(self.probe_chunks, len(ranges)))):
            self._probe(session, base, None, "before")
        try:
            for k, (lo, hi) in enumerate(ranges):
                if k in done:
                    continue
                self.current_chunk = k
                kwargs = request_kwargs(records[lo:hi], loc_prompts[lo:hi])
                probe = bool(self.probe_items) and k < self.probe_chunks
                start = time.perf_counter()
                with self._quiet():
                    if session.batchable and not (self.generation or self.wild or probe):
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
        edited, handle, seconds = session.apply(requests, None)
        for metric, request in zip(metrics, requests):
            metric["time"] = seconds
            metric["post"] = session.evaluate(edited, request)
            if self.generation or self.wild:
                metric["generation"] = self._generated(session, edited, request)
        if probe:
            self._probe(session, base, chunk, "after", edited)
        session.restore(edited, handle)
        for metric, request in zip(metrics, requests):
            session.finalize(metric, request)
        return metrics, seconds

    def _probe(self, session, base: dict, chunk: Optional[int], stage: str, model=None) -> None:
        start = time.perf_counter()
        with self._quiet():
            scores = session.probe(session.model if model is None else model, self.probe_items)
        self.store.append({"type": "probe", **base, "chunk": chunk, "stage": stage, "tasks": scores,
                           "seconds": time.perf_counter() - start})

    # ---------------------------------------------------------------- sequential checkpoints
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
            if self.probe_items:
                self._probe(session, base, None, "before")
            if checkpoint is not None:
                edited, handle, pre, first = self._resume_from(run, session, base, checkpoint)
                bar.update(len(requests) + first)
            else:
                pre = []
                for request in requests:          # "pre" on the unedited model, for every edit
                    with self._quiet():
                        pre.append(session.evaluate(session.model, request))
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
                    if self.generation or self.wild:
                        final[-1]["generation"] = self._generated(session, edited, request)
                bar.update(1)
            if self.probe_items:
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
