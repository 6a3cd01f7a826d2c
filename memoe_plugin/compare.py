"""memoe-compare: MEMoE next to EasyEdit's baselines, under the paper's batch and sequential protocols.

    memoe-compare --data zsre --num-edits 30 --methods MEMoE,FT-L,FT-M,LoRA,GRACE,WISE,MEMIT \\
                  [--protocol batch|sequential] [--batch-size N] [--out DIR] [--resume]

Everything that edits or scores goes through EasyEdit itself: records come from
its ``ZsreDataset`` / ``CounterFactDataset``, requests from its ``_prepare_requests``,
edits from its ``ALG_DICT`` apply functions (through ``BaseEditor``), scores from
``compute_edit_quality`` + ``finalize_locality_metrics``, rollback from
``restore_after_edit``. This module only decides what runs in which order, writes
the results as they come, and tabulates them.

Protocols (see docs/compare.md):

* ``batch`` (paper Table 1): the edits are cut into chunks of ``--batch-size``
  (30). For a method EasyEdit can batch (MEMoE, FT, LoRA, MEMIT, ...) one
  ``BaseEditor.batch_edit(chunk, sequential_edit=False)`` call edits, scores and
  rolls back each chunk. A method EasyEdit edits one request at a time (GRACE,
  WISE, ROME, ...) gets the chunk's edits one after another on the same model,
  then the chunk is scored, then rolled back. After every chunk the model's
  ``state_dict`` is hashed and compared with the unedited model's.
* ``sequential``: chunks of ``--batch-size`` (10) are applied one after another
  with no rollback; every edit is scored after the last chunk (as the paper),
  against "pre" scores taken on the unedited model. ``--eval-every-step`` also
  scores all edits so far after every chunk.

Outputs in ``--out``: ``results.jsonl`` (one line per scored case, per chunk,
per error; appended and fsynced as produced, so an interrupted run loses at most
the chunk in progress and ``--resume`` continues after the last finished chunk),
``summary.md`` / ``.csv`` / ``.json`` / ``.png``, ``hparams/<METHOD>.yaml`` (the
exact settings used) and EasyEdit's own ``logs/``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
HPARAMS_ROOT = REPO / "hparams"
DEFAULT_HPARAMS_DIR = HPARAMS_ROOT / "compare" / "smollm2-135m"
MEMOE_DEFAULT_HPARAMS = HPARAMS_ROOT / "MEMoE" / "smollm2-135m.yaml"
DATA_DIR = REPO.parent / "shared" / "data"
DATA_FILES = {"zsre": "zsre_mend_eval_portability_gpt4.json", "counterfact": "counterfact-edit.json"}
DEFAULT_BATCH_SIZE = {"batch": 30, "sequential": 10}
RESULTS_FILE = "results.jsonl"
PATH_KEYS = ("model_name", "stats_dir", "P_loc", "save_path", "load_path")
# Methods whose covariance statistics EasyEdit computes from a Wikipedia download.
STATS_ALGS = ("ROME", "MEMIT", "EMMET", "AlphaEdit", "PMET", "R-ROME")


class CompareError(Exception):
    """A usage or setup problem; main() prints it and exits with status 2."""


class MethodUnavailable(Exception):
    """The method cannot run here (e.g. offline without its statistics); reported, not raised."""


class RollbackError(RuntimeError):
    """The model did not come back bit for bit after a chunk's rollback."""


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    name: str                    # the table's name: FT-L
    alg_name: str                # EasyEdit's ALG_DICT key: FT
    hparams_class: str           # attribute of easyeditor (memoe_plugin for MEMoE)
    steps_key: Optional[str]     # what METHOD.steps=N sets
    fixed: tuple = ()            # (key, value) pairs that define the method
    note: str = ""
    unavailable: str = ""        # non-empty: never runnable here, and why

    def fixed_dict(self) -> dict:
        return dict(self.fixed)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("MEMoE", "MEMoE", "MEMoEHyperParams", "steps"),
    MethodSpec("FT-L", "FT", "FTHyperParams", "num_steps", (("objective_optimization", "prompt_last"),),
               "EasyEdit FT, objective_optimization prompt_last"),
    MethodSpec("FT-M", "FT", "FTHyperParams", "num_steps", (("objective_optimization", "target_new"),),
               "EasyEdit FT, objective_optimization target_new"),
    MethodSpec("LoRA", "LoRA", "LoRAHyperParams", "num_steps"),
    MethodSpec("ROME", "ROME", "ROMEHyperParams", "v_num_grad_steps"),
    MethodSpec("MEMIT", "MEMIT", "MEMITHyperParams", "v_num_grad_steps"),
    MethodSpec("GRACE", "GRACE", "GraceHyperParams", "n_iter"),
    MethodSpec("WISE", "WISE", "WISEHyperParams", "n_iter"),
    MethodSpec("MEND", "MEND", "MENDHyperParams", None, unavailable=(
        "needs a MEND hypernetwork checkpoint (hparams 'archive') trained for this model with EasyEdit's "
        "EditTrainer on the ZsRE/CounterFact train splits; none exists for SmolLM2 here")),
    MethodSpec("SERAC", "SERAC", "SERACHparams", None, unavailable=(
        "needs a SERAC scope classifier and counterfactual model (hparams 'archive') trained with EasyEdit's "
        "EditTrainer on the ZsRE/CounterFact train splits; none exists for SmolLM2 here")),
)}
DEFAULT_METHODS = ("MEMoE", "FT-L", "FT-M", "LoRA", "MEMIT", "GRACE", "WISE")


def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    lookup = {n.lower(): n for n in METHODS}
    out = []
    for name in names:
        if name.lower() not in lookup:
            raise CompareError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        canonical = lookup[name.lower()]
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise CompareError("--methods is empty")
    return out


def parse_overrides(items: Iterable[str], methods: Iterable[str]) -> dict[str, dict]:
    """``["FT-L.steps=20", "WISE.n_iter=5"]`` -> ``{"FT-L": {"steps": 20}, ...}`` (values parsed as YAML)."""
    lookup = {n.lower(): n for n in METHODS}
    out: dict[str, dict] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CompareError(f"--set {item!r}: expected METHOD.key=value, e.g. FT-L.steps=20")
        target, value = item.split("=", 1)
        method, key = target.split(".", 1)
        if method.lower() not in lookup:
            raise CompareError(f"--set {item!r}: unknown method {method!r}; known: {', '.join(METHODS)}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):       # PyYAML reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out.setdefault(lookup[method.lower()], {})[key.strip()] = parsed
    unused = set(out) - set(methods)
    if unused:
        raise CompareError(f"--set names {sorted(unused)}, which are not in --methods")
    return out


def hparams_path_for(method: str, hparams_dir: Optional[Path], explicit: dict[str, Path]) -> Path:
    """Which YAML a method reads: --hparams METHOD=FILE, else --hparams-dir/METHOD.yaml, else the shipped one."""
    if method in explicit:
        return explicit[method]
    if hparams_dir is not None and (hparams_dir / f"{method}.yaml").is_file():
        return hparams_dir / f"{method}.yaml"
    if method == "MEMoE":
        return MEMOE_DEFAULT_HPARAMS
    return DEFAULT_HPARAMS_DIR / f"{method}.yaml"


def build_config(method: str, path: Path, overrides: dict, model: Optional[str],
                 allowed_keys: Optional[Iterable[str]] = None) -> dict:
    """The method's YAML with --set overrides and --model applied, and ``~`` expanded in paths."""
    spec = METHODS[method]
    if not path.is_file():
        raise CompareError(f"{method}: hparams file {path} not found (pass --hparams {method}=FILE or --hparams-dir)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise CompareError(f"{path}: expected a YAML mapping")
    if config.get("alg_name") != spec.alg_name:
        raise CompareError(f"{path}: alg_name is {config.get('alg_name')!r}; {method} needs {spec.alg_name!r}")
    known = set(config) | set(allowed_keys or ())
    for key, value in (overrides or {}).items():
        if key == "steps" and spec.steps_key and "steps" not in known:
            key = spec.steps_key
        if key not in known:
            raise CompareError(f"--set {method}.{key}: {method}'s hparams have no key {key!r} "
                               f"(keys: {', '.join(sorted(known))}; 'steps' means {spec.steps_key})")
        config[key] = value
    for key, value in spec.fixed:
        if config.get(key) != value:
            raise CompareError(f"{method} is {spec.alg_name} with {key}: {value}, but {path} or --set gives "
                               f"{config.get(key)!r}")
    if model:
        config["model_name"] = model
    for key in PATH_KEYS:
        if isinstance(config.get(key), str):
            config[key] = os.path.expanduser(config[key]).rstrip("/") or "/"
    return config


# ----------------------------------------------------------------------------- data
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


# ----------------------------------------------------------------------------- restore handles
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


# ----------------------------------------------------------------------------- fingerprint
def state_fingerprint(model) -> str:
    """blake2b over every state_dict key, shape, dtype and byte: equal iff the model is bit-identical."""
    import torch
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- results store
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
        with self.path.open("a") as handle:
            for record in records:
                handle.write(json.dumps(record, default=_jsonable) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- run plan
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
                bar.set_postfix(rel=f"{_mean_of(metrics, 'rewrite_acc'):.2f}", rollback="exact" if exact else "DIFF")
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


def _mean_of(metrics: list[dict], key: str) -> float:
    values = [_flat_mean(m.get("post", {}).get(key)) for m in metrics]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def _flat_mean(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        flat = [_flat_mean(v) for v in value]
        flat = [v for v in flat if v is not None]
        return sum(flat) / len(flat) if flat else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- summary
def case_scores(metric: dict) -> dict:
    """Reliability / generality / locality of one EasyEdit metric dict, in [0, 1] (None when absent)."""
    post = metric.get("post", {})
    locality = post.get("locality", {}) or {}
    loc_values = [_flat_mean(v) for k, v in locality.items() if k.endswith("_acc")]
    loc_values = [v for v in loc_values if v is not None]
    return {"reliability": _flat_mean(post.get("rewrite_acc")),
            "generality": _flat_mean(post.get("rephrase_acc")),
            "locality": sum(loc_values) / len(loc_values) if loc_values else None}


def summarise(records: list[dict]) -> list[dict]:
    """One row per run key, from the results.jsonl records (the latest attempt wins where attempts overlap)."""
    runs: dict[str, dict] = {}
    for rec in records:
        key = rec.get("run")
        if key is None:
            continue
        row = runs.setdefault(key, {"run": key, "starts": [], "chunks": {}, "cases": {}, "errors": [],
                                    "complete_attempts": set(), "restore": None, "steps": {}})
        kind = rec["type"]
        if kind == "run_start":
            row["starts"].append(rec)
        elif kind == "run_info":
            row["info"] = rec
        elif kind == "chunk":
            row["chunks"].setdefault(rec["attempt"], {})[rec["chunk"]] = rec
        elif kind == "case":
            row["cases"].setdefault(rec["attempt"], []).append(rec)
        elif kind == "error":
            row["errors"].append(rec)
        elif kind == "run_end" and rec.get("status") == "complete":
            row["complete_attempts"].add(rec["attempt"])
        elif kind == "restore":
            row["restore"] = rec
    return [_summarise_run(row) for row in runs.values()]


def _summarise_run(row: dict) -> dict:
    start = row.get("info", {})
    dataset, protocol, bs, n, method = (row["run"].split("|") + [""] * 5)[:5]
    out = {"dataset": dataset, "protocol": protocol, "batch_size": int(bs.split("=")[1]) if "=" in bs else None,
           "num_edits": int(n.split("=")[1]) if "=" in n else None, "method": method,
           "note": start.get("note", ""), "batchable": start.get("batchable")}
    if protocol == "batch":
        chosen: dict[int, dict] = {}        # chunk -> its latest chunk record
        for attempt, chunks in row["chunks"].items():
            for k, rec in chunks.items():
                chosen[k] = rec
        cases = [c for attempt, cs in row["cases"].items() for c in cs
                 if c["chunk"] in chosen and chosen[c["chunk"]]["attempt"] == attempt and c.get("final", True)]
        chunk_recs = list(chosen.values())
        rollback = [rec.get("rollback_exact") for rec in chunk_recs]
        n_chunks = len(chunk_ranges(out["num_edits"], out["batch_size"])) if out["num_edits"] else None
        complete = n_chunks is not None and len(chosen) >= n_chunks
    else:
        attempts = [a for a in row["complete_attempts"]]
        attempt = attempts[-1] if attempts else None
        cases = [c for c in row["cases"].get(attempt, []) if c.get("final")]
        steps = {}
        for c in row["cases"].get(attempt, []):
            if not c.get("final"):
                steps.setdefault(c["step"], []).append(c)
        out["steps"] = {k: _aggregate([c["metric"] for c in v]) for k, v in sorted(steps.items())}
        chunk_recs = list(row["chunks"].get(attempt, {}).values())
        rollback = [row["restore"].get("rollback_exact")] if row["restore"] and attempt else []
        complete = attempt is not None
    cases.sort(key=lambda c: c["index"])
    out.update(_aggregate([c["metric"] for c in cases]))
    out["cases"] = len(cases)
    out["edit_seconds"] = sum(float(r.get("edit_seconds") or 0.0) for r in chunk_recs) if chunk_recs else None
    out["seconds_per_edit"] = (out["edit_seconds"] / len(cases)) if cases and out["edit_seconds"] else None
    if not rollback or any(r is None for r in rollback):
        out["rollback"] = "n/a" if not rollback else "not checked"
    else:
        out["rollback"] = "exact" if all(rollback) else "DIFFERS"
    last_error = row["errors"][-1] if row["errors"] else None
    if complete:
        out["status"] = "complete"
    elif last_error is not None and last_error.get("kind") == "unavailable":
        out["status"] = "unavailable offline"
    elif last_error is not None:
        out["status"] = "error"
    else:
        out["status"] = "partial"
    out["error"] = "" if complete or last_error is None else last_error["error"]
    return out


def _aggregate(metrics: list[dict]) -> dict:
    scores = [case_scores(m) for m in metrics]
    out = {}
    for key in ("reliability", "generality", "locality"):
        values = [s[key] for s in scores if s[key] is not None]
        out[key] = 100.0 * sum(values) / len(values) if values else None
    parts = [out[k] for k in ("reliability", "generality", "locality")]
    out["average"] = sum(parts) / 3 if all(p is not None for p in parts) else None
    return out


def _fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


CSV_FIELDS = ("dataset", "protocol", "batch_size", "num_edits", "method", "status", "cases", "reliability",
              "generality", "locality", "average", "edit_seconds", "seconds_per_edit", "rollback", "note", "error")


def write_summary(out_dir: Path, rows: list[dict], method_order: Optional[list[str]] = None,
                  commands: Optional[list[str]] = None) -> dict[str, Path]:
    """summary.md / .csv / .json / .png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    order = {m: i for i, m in enumerate(method_order or list(METHODS))}
    rows = sorted(rows, key=lambda r: (r["protocol"], r["batch_size"] or 0, r["num_edits"] or 0,
                                       order.get(r["method"], 99), r["method"], r["dataset"]))
    paths = {"json": out_dir / "summary.json", "csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    paths["json"].write_text(json.dumps(rows, indent=2, default=_jsonable))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    paths["md"].write_text(markdown_summary(rows, commands))
    png = plot_summary(out_dir / "summary.png", rows)
    if png:
        paths["png"] = png
    return paths


def _groups(rows):
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["batch_size"], row["num_edits"]), []).append(row)
    return groups


def markdown_summary(rows: list[dict], commands: Optional[list[str]] = None) -> str:
    lines = ["# memoe-compare results", ""]
    if commands:
        lines += ["Commands:", ""] + [f"    {c}" for c in commands] + [""]
    lines += ["Reliability = EasyEdit `rewrite_acc`, Generality = `rephrase_acc`, Locality = `neighborhood_acc` "
              "(post-edit, in %, mean over edits); Average = their mean. Edit time = seconds spent in the "
              "method's apply function (EasyEdit's `time`), over all edits, and per edit.", ""]
    notes: list[str] = []
    for (protocol, bs, n), group in _groups(rows).items():
        datasets = sorted({r["dataset"] for r in group}, key=lambda d: (d != "zsre", d))
        methods = list(dict.fromkeys(r["method"] for r in group))
        by = {(r["dataset"], r["method"]): r for r in group}
        lines.append(f"## {protocol} protocol, batch size {bs}, {n} edits")
        lines.append("")
        head = ["Method"]
        for d in datasets:
            head += [f"{d} Rel.", f"{d} Gen.", f"{d} Loc.", f"{d} Avg.", f"{d} edit s (s/edit)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in methods:
            cells = [m]
            for d in datasets:
                r = by.get((d, m))
                if r is None:
                    cells += ["", "", "", "", ""]
                    continue
                if r["status"] in ("error", "unavailable offline") and not r["cases"]:
                    cells += [r["status"], "–", "–", "–", "–"]
                else:
                    flag = "" if r["status"] == "complete" else f" ({r['status']}, {r['cases']} edits)"
                    cells += [_fmt(r["reliability"]) + flag, _fmt(r["generality"]), _fmt(r["locality"]),
                              _fmt(r["average"]),
                              f"{_fmt(r['edit_seconds'], 0)} ({_fmt(r['seconds_per_edit'], 2)})"]
                if r["error"]:
                    notes.append(f"- {d} / {m} ({protocol}): **{r['status']}**: {r['error']}")
                if r["rollback"] == "DIFFERS":
                    notes.append(f"- {d} / {m} ({protocol}): rollback did NOT restore the model bit for bit")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        how = {r["method"]: r["note"] for r in group if r.get("note")}
        rollback = {r["method"]: r["rollback"] for r in group}
        if how:
            lines.append("How each method ran:")
            lines.append("")
            for m in methods:
                if m in how:
                    lines.append(f"- {m}: {how[m]}; rollback check: {rollback.get(m)}")
            lines.append("")
        steps = [(r["dataset"], r["method"], r["steps"]) for r in group if r.get("steps")]
        for d, m, per_step in steps:
            lines.append(f"Per-step scores ({d} / {m}, edits so far):")
            lines.append("")
            lines.append("| step | Rel. | Gen. | Loc. | Avg. |")
            lines.append("|---|---|---|---|---|")
            for k, s in per_step.items():
                lines.append(f"| {k} | {_fmt(s['reliability'])} | {_fmt(s['generality'])} | "
                             f"{_fmt(s['locality'])} | {_fmt(s['average'])} |")
            lines.append("")
    if notes:
        lines += ["Problems:", ""] + list(dict.fromkeys(notes)) + [""]
    return "\n".join(lines)


def plot_summary(path: Path, rows: list[dict]) -> Optional[Path]:
    """Grouped bar chart: one panel per (protocol group, dataset), bars Rel/Gen/Loc/Avg per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[memoe-compare] matplotlib is not installed: no summary.png (pip install matplotlib)",
              file=sys.stderr)
        return None
    panels = []
    for (protocol, bs, n), group in _groups(rows).items():
        for d in sorted({r["dataset"] for r in group}, key=lambda d: (d != "zsre", d)):
            panels.append((f"{d}, {protocol} (bs {bs}, {n} edits)", [r for r in group if r["dataset"] == d]))
    if not panels:
        return None
    keys = ("reliability", "generality", "locality", "average")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.3 * max(len(p[1]) for p in panels) + 2),
                                                     3.4 * len(panels)), squeeze=False)
    width = 0.2
    for ax, (title, group) in zip(axes[:, 0], panels):
        for j, key in enumerate(keys):
            values = [r[key] if r[key] is not None else 0.0 for r in group]
            ax.bar([i + (j - 1.5) * width for i in range(len(group))], values, width, label=key.capitalize())
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([r["method"] if r["status"] == "complete" else f"{r['method']}\n({r['status']})"
                            for r in group], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=4, fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.06 / len(panels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- EasyEdit backend
class EasyEditBackend:
    """Loads records and opens one BaseEditor per method, all through an EasyEdit checkout."""

    def __init__(self, easyedit_path: Optional[str], data_files: dict[str, Path], hparams_paths: dict[str, Path],
                 overrides: dict[str, dict], model: Optional[str], out_dir: Path,
                 stats_text: Optional[Path] = None, verbose: bool = False):
        import memoe_plugin
        try:
            memoe_plugin.register(easyedit_path)
        except memoe_plugin.EasyEditNotFoundError as err:
            raise CompareError(str(err)) from None
        import easyeditor
        self.ee = easyeditor
        self.data_files, self.hparams_paths, self.overrides = data_files, hparams_paths, overrides
        self.model, self.out_dir, self.stats_text, self.verbose = model, Path(out_dir), stats_text, verbose
        self._records: dict[tuple, tuple] = {}
        if not verbose:
            _quiet_easyedit_logging()

    def records(self, dataset: str, num_edits: int) -> tuple[list[dict], list[str]]:
        key = (dataset, num_edits)
        if key not in self._records:
            self._records[key] = split_records(load_records(self.ee, dataset, self.data_files[dataset]), num_edits)
        return self._records[key]

    def hparams(self, method: str):
        spec = METHODS[method]
        if method == "MEMoE":
            from .hparams import MEMoEHyperParams as cls
            allowed = [f.name for f in dataclasses.fields(cls)]
        else:
            cls = getattr(self.ee, spec.hparams_class)
            allowed = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        config = build_config(method, self.hparams_paths[method], self.overrides.get(method, {}), self.model, allowed)
        path = self.out_dir / "hparams" / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {method}: effective hparams (from {self.hparams_paths[method]})\n"
                        + yaml.safe_dump(config, sort_keys=False))
        return cls.from_hparams(str(path)), path

    def open_method(self, run: RunSpec) -> "EasyEditSession":
        hparams, path = self.hparams(run.method)
        _seed(42)
        editor = self.ee.BaseEditor.from_hparams(hparams)
        if not self.verbose:
            _quiet_easyedit_logging()
        session = EasyEditSession(self.ee, editor, run, path, self.records(run.dataset, run.num_edits))
        if run.method == "WISE":
            hparams.sequential_edit = True    # WISE.py: reuse the side memory across the requests of a chunk
        if hparams.alg_name in STATS_ALGS and getattr(hparams, "mom2_adjustment", True):
            ensure_stats(editor, hparams, self.stats_text)
        return session


class EasyEditSession:
    """One method on one BaseEditor: thin calls into EasyEdit."""

    def __init__(self, easyeditor, editor, run: RunSpec, hparams_path: Path, records):
        from easyeditor.editors import utils as editor_utils
        from easyeditor.editors.batch_editor import BatchEditor
        from easyeditor.editors.editor import finalize_locality_metrics
        from easyeditor.evaluate import compute_edit_quality
        self.editor, self.run, self.hparams_path, self.records = editor, run, hparams_path, records
        self._utils, self._compute, self._finalize = editor_utils, compute_edit_quality, finalize_locality_metrics
        self.alg_name = editor.alg_name
        self.batchable = bool(BatchEditor.is_batchable_method(self.alg_name))
        if self.batchable:
            editor.hparams.batch_size = run.batch_size
        elif hasattr(editor.hparams, "batch_size"):
            editor.hparams.batch_size = 1      # EasyEdit's single-edit contract

    @property
    def model(self):
        return self.editor.model

    def describe(self) -> dict:
        return {"file": str(self.hparams_path), "alg_name": self.alg_name}

    def batch_edit(self, kwargs: dict) -> list[dict]:
        self.editor.hparams.batch_size = len(kwargs["prompts"])
        metrics, _, _ = self.editor.batch_edit(**kwargs, sequential_edit=False, verbose=False)
        return metrics

    def prepare(self, kwargs: dict) -> list[dict]:
        kwargs = dict(kwargs)
        prompts, target_new, ground_truth = kwargs.pop("prompts"), kwargs.pop("target_new"), kwargs.pop("ground_truth")
        ground_truth = self._utils.normalize_ground_truths(ground_truth, prompts)
        return self._utils._prepare_requests(prompts, target_new, ground_truth,
                                             rephrase_prompts=kwargs.pop("rephrase_prompts"),
                                             locality_inputs=kwargs.pop("locality_inputs"), **kwargs)

    def evaluate(self, model, request: dict) -> dict:
        hp = self.editor.hparams
        return self._compute(model, self.editor.model_name, hp, self.editor.tok, request, hp.device)

    def apply(self, requests: list[dict], handle):
        """Edit ``editor.model`` with ``requests`` as EasyEdit's batch_edit (batchable) or edit (one by one) does."""
        editor, seconds, edited = self.editor, 0.0, None
        groups = [requests] if self.batchable else [[r] for r in requests]
        for group in groups:
            start = time.perf_counter()
            edited, weights_copy = editor.apply_algo(editor.model, editor.tok, group, editor.hparams, copy=False,
                                                     return_orig_weights=True, keep_original_weight=False,
                                                     train_ds=None)
            seconds += time.perf_counter() - start
            handle = combine_restore(handle, weights_copy, self._utils.CALLABLE_RESTORE_ALGS, self.alg_name)
            if self.batchable:
                editor.model = edited        # as batch_edit(sequential_edit=True)
        return edited, handle, seconds

    def restore(self, edited, handle) -> None:
        self._utils.restore_after_edit(self.editor, edited, handle)

    def finalize(self, metric: dict, request: dict) -> None:
        self._finalize(metric, request, self.editor.hparams, self.editor.model_name)

    def close(self) -> None:
        self.editor.model = None
        import gc
        gc.collect()


def load_records(easyeditor, dataset: str, path: Path) -> list[dict]:
    """Flat records through EasyEdit's own dataset classes (+ ZsRE's subject, which ZsreDataset drops)."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"data file {path} not found; pass --data-file")
    if dataset == "zsre":
        data = easyeditor.ZsreDataset(str(path))
        raw = json.loads(path.read_text())
        records = []
        for i in range(len(data)):
            record = dict(data[i])
            record["subject"] = raw[record["case_id"]]["subject"]
            records.append(record)
        return records
    # counterfact-edit.json is EasyEdit's flat CounterFact split: CounterFactDataset returns its records as they are.
    data = easyeditor.CounterFactDataset(str(path))
    records = [dict(data[i]) for i in range(len(data))]
    missing = [k for k in ("prompt", "target_new", "subject", "rephrase_prompt", "locality_prompt",
                           "locality_ground_truth") if k not in records[0]]
    if missing:
        raise CompareError(f"{path}: CounterFact records need {missing} (EasyEdit's flat counterfact-edit.json format)")
    return records


def _seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:   # pragma: no cover
        pass
    import torch
    torch.manual_seed(seed)


def _quiet_easyedit_logging() -> None:
    """EasyEdit adds a console handler per BaseEditor and logs every edit at INFO: keep only warnings on screen."""
    import logging
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- covariance statistics
class _LocalText:
    """A ``datasets``-like list of ``{"text": ...}`` rows read from a local text file (one sample per line)."""

    def __init__(self, path: Path):
        self.rows = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if not self.rows:
            raise CompareError(f"--stats-text {path}: no non-empty lines")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"text": self.rows[i]}


class _StatsMissing(Exception):
    pass


def _no_progress(iterable, **kwargs):
    return iterable


def stats_file(model, hparams, layer_name: str) -> Path:
    """Where EasyEdit's layer_stats keeps (and looks for) one layer's second moment (mirrors its naming)."""
    model_name = model.config._name_or_path.rsplit("/")[-1]
    return (Path(hparams.stats_dir) / model_name / f"{hparams.mom2_dataset}_stats" /
            f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz")


def ensure_stats(editor, hparams, stats_text: Optional[Path]) -> list[Path]:
    """Make sure EasyEdit finds the covariance stats for every edited layer without downloading.

    Each layer is asked from EasyEdit's own ``layer_stats``; its dataset loader is
    swapped for one that raises (check only) or that reads ``stats_text`` (compute),
    so the file lands exactly where EasyEdit looks for it and holds EasyEdit's own
    ``SecondMoment`` over the inputs of ``rewrite_module_tmp``.
    """
    from easyeditor.models.rome import layer_stats as ls_module
    layers = hparams.layers if hasattr(hparams, "layers") else []
    names = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
    original = ls_module.load_dataset
    files = []
    try:
        for name in names:
            target = stats_file(editor.model, hparams, name)
            files.append(target)

            def missing(*args, **kwargs):
                raise _StatsMissing
            ls_module.load_dataset = missing
            try:
                ls_module.layer_stats(editor.model, editor.tok, name, hparams.stats_dir, hparams.mom2_dataset,
                                      to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                                      precision=hparams.mom2_dtype, hparams=hparams, progress=_no_progress)
                continue
            except _StatsMissing:
                pass
            if stats_text is None:
                raise MethodUnavailable(
                    f"{hparams.alg_name} needs covariance statistics of {name} that EasyEdit computes from "
                    f"Wikipedia, which it downloads; no stats file at {target}. Compute them from local text "
                    "with --stats-text FILE (docs/compare.md)")
            corpus = _LocalText(stats_text)
            ls_module.load_dataset = lambda *args, **kwargs: {"train": corpus}
            print(f"[memoe-compare] computing {hparams.alg_name} covariance statistics for {name} from "
                  f"{stats_text} ({len(corpus)} lines) with EasyEdit's layer_stats -> {target}", file=sys.stderr)
            ls_module.layer_stats(editor.model, editor.tok, name, hparams.stats_dir, hparams.mom2_dataset,
                                  to_collect=["mom2"], sample_size=hparams.mom2_n_samples,
                                  precision=hparams.mom2_dtype, hparams=hparams)
            target.with_suffix(".source.json").write_text(json.dumps(
                {"source": str(Path(stats_text).resolve()), "lines": len(corpus),
                 "samples_used": min(len(corpus), int(hparams.mom2_n_samples)),
                 "note": "computed by memoe-compare --stats-text with EasyEdit's layer_stats; "
                         "the file name keeps EasyEdit's mom2_dataset/mom2_n_samples naming"}, indent=2))
    finally:
        ls_module.load_dataset = original
    return files


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memoe-compare", description="MEMoE vs EasyEdit baselines (paper Table 1 protocols), scored by EasyEdit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: memoe-compare --data zsre --num-edits 30 --methods MEMoE,FT-L,FT-M,LoRA,GRACE,WISE")
    parser.add_argument("--easyedit", default=os.environ.get("EASYEDIT_PATH"),
                        help="EasyEdit checkout (default: $EASYEDIT_PATH)")
    parser.add_argument("--model", help="model directory for every method (default: each hparams' model_name)")
    parser.add_argument("--data", default="zsre",
                        help="zsre, counterfact, or both comma-separated (default zsre)")
    parser.add_argument("--data-file", help="the data file (one dataset only; default ../shared/data/<file>)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--hparams-dir", help="directory with <METHOD>.yaml files that replace the shipped ones")
    parser.add_argument("--hparams", action="append", default=[], metavar="METHOD=FILE",
                        help="one method's hparams file (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.key=value", dest="overrides",
                        help="override one hparam (repeatable); METHOD.steps maps to the method's step count")
    parser.add_argument("--protocol", choices=("batch", "sequential"), default="batch")
    parser.add_argument("--batch-size", type=int, help="chunk size (default 30 for batch, 10 for sequential)")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--eval-every-step", action="store_true",
                        help="sequential: also score all edits so far after every chunk")
    parser.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --out: finished chunks/methods are skipped")
    parser.add_argument("--stats-text", help="local text file (one sample per line) to compute missing "
                        "ROME/MEMIT covariance statistics from, instead of EasyEdit's Wikipedia download")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the summary files from results.jsonl")
    parser.add_argument("--list-methods", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show EasyEdit's own output instead of logging it")
    return parser


def plan_runs(datasets: list[str], methods: list[str], protocol: str, batch_size: int, num_edits: int,
              eval_every_step: bool) -> list[RunSpec]:
    return [RunSpec(d, m, protocol, batch_size, num_edits, eval_every_step) for d in datasets for m in methods]


def main(argv: Optional[list[str]] = None, backend_factory: Optional[Callable[..., Any]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        for name, spec in METHODS.items():
            path = hparams_path_for(name, None, {})
            state = f"unavailable: {spec.unavailable}" if spec.unavailable else str(path)
            print(f"{name:8s} EasyEdit {spec.alg_name:6s} {state}")
        return 0
    try:
        return _main(args, argv, backend_factory)
    except CompareError as err:
        print(f"memoe-compare: error: {err}", file=sys.stderr)
        return 2


def _main(args, argv, backend_factory) -> int:
    out_dir = Path(args.out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir / RESULTS_FILE)
    command = "memoe-compare " + " ".join(argv if argv is not None else sys.argv[1:])
    commands_file = out_dir / "commands.txt"
    if args.summarize_only:
        rows = summarise(store.records())
        paths = write_summary(out_dir, rows, commands=_read_commands(commands_file))
        print(paths["md"].read_text())
        return 0
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    for d in datasets:
        if d not in DATA_FILES:
            raise CompareError(f"--data {d!r}: choose from {', '.join(DATA_FILES)}")
    if args.data_file and len(datasets) != 1:
        raise CompareError("--data-file needs exactly one --data")
    data_files = {d: Path(args.data_file).expanduser().resolve() if args.data_file else DATA_DIR / DATA_FILES[d]
                  for d in datasets}
    methods = parse_methods(args.methods)
    overrides = parse_overrides(args.overrides, methods)
    explicit = {}
    for item in args.hparams:
        if "=" not in item:
            raise CompareError(f"--hparams {item!r}: expected METHOD=FILE")
        name, file = item.split("=", 1)
        explicit[parse_methods(name)[0]] = Path(file).expanduser().resolve()
    hparams_dir = Path(args.hparams_dir).expanduser().resolve() if args.hparams_dir else None
    hparams_paths = {m: hparams_path_for(m, hparams_dir, explicit) for m in methods}
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.protocol]
    runs = plan_runs(datasets, methods, args.protocol, batch_size, args.num_edits, args.eval_every_step)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    stats_text = Path(args.stats_text).expanduser().resolve() if args.stats_text else None
    model = str(Path(args.model).expanduser().resolve()) if args.model else None
    factory = backend_factory or EasyEditBackend
    runner = Runner(None, store, resume=args.resume, progress=not args.no_progress)
    if not args.resume:
        runner.check_fresh(runs)
    with commands_file.open("a") as handle:
        handle.write(command + "\n")
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    cwd = os.getcwd()
    interrupted = False
    with open(log_dir / "easyedit-stdout.log", "a", buffering=1) as log:
        os.chdir(out_dir)    # EasyEdit writes logs/run.log into the working directory
        try:
            backend = factory(easyedit_path=args.easyedit, data_files=data_files, hparams_paths=hparams_paths,
                              overrides=overrides, model=model, out_dir=out_dir, stats_text=stats_text,
                              verbose=args.verbose)
            runner.backend, runner.log = backend, (None if args.verbose else log)
            runner.resume = True     # freshness was checked above
            for run in runs:
                runner.run_one(run)
        except KeyboardInterrupt:
            interrupted = True
            print("\n[memoe-compare] interrupted; finished chunks are in results.jsonl. "
                  "Continue with the same command plus --resume.", file=sys.stderr)
        finally:
            os.chdir(cwd)
    rows = summarise(store.records())
    paths = write_summary(out_dir, rows, methods, _read_commands(commands_file))
    print(paths["md"].read_text())
    print(f"[memoe-compare] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 130 if interrupted else 0


def _read_commands(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    sys.exit(main())
