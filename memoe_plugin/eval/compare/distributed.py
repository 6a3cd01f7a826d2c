"""memoe-compare on Ray: independent units of work as Ray tasks, results streamed into the driver's store.

A unit is one rolled-back chunk of a batch-protocol run (the chunks of the batch protocol are independent:
each starts from the unedited model), or one whole sequential run (its chunks build on each other). Each
unit runs in a Ray task with its own backend (the method's model loaded there) and a :class:`Runner` over
an in-memory store that starts with the run's records so far (for a sequential run's checkpoints); the
task returns the records it added, and the driver appends them to ``results.jsonl`` as each task finishes,
so the file, ``--resume`` and the report work exactly as in a sequential comparison. Ray retries a task that
fails (a lost worker, an exception); a unit that still fails is recorded as that run's error, and the other
units go on.

    memoe-compare ... --ray              # a local Ray cluster on this machine
    memoe-compare ... --ray auto         # the cluster `ray start --head` started (or RAY_ADDRESS)
    memoe-compare ... --ray ray://host:10001
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import CompareError
from .plan import RunSpec
from .protocol import Runner


@dataclass(frozen=True)
class Unit:
    """One Ray task: ``run``, or only ``chunks`` of it (batch protocol)."""
    run: RunSpec
    chunks: Optional[tuple[int, ...]] = None

    @property
    def name(self) -> str:
        return self.run.key if self.chunks is None else f"{self.run.key}|chunks={','.join(map(str, self.chunks))}"


class MemoryStore:
    """A ResultStore in memory: what a task's Runner reads (the run's records so far) and adds."""

    def __init__(self, records: list[dict]):
        self._records, self.added = list(records), []

    def records(self) -> list[dict]:
        return list(self._records)

    def append(self, *records: dict) -> None:
        self._records.extend(records)
        self.added.extend(records)


def plan_units(runner: Runner, runs: list[RunSpec]) -> list[Unit]:
    """The work left in ``runs``: each pending chunk of a batch run, each unfinished sequential run."""
    units = []
    for run in runs:
        pending = runner.pending(run)
        if pending is None:
            units.append(Unit(run))
        else:
            units.extend(Unit(run, (k,)) for k in pending)
    return units


def run_unit(factory: Callable, factory_kwargs: dict, settings: dict, unit: Unit, records: list[dict]) -> list[dict]:
    """What one task does: open a backend, run the unit over an in-memory store, return the new records."""
    import json
    settings = dict(settings)
    threads = settings.pop("threads", None)
    if threads:
        import torch
        torch.set_num_threads(threads)
    store = MemoryStore(json.loads(json.dumps(records)))   # the task's own copy
    runner = Runner(factory(**factory_kwargs), store, resume=True, progress=False, **settings)
    try:
        runner.run_one(unit.run, only_chunks=unit.chunks)
    finally:
        backend_close = getattr(runner.backend, "close", None)
        if callable(backend_close):
            backend_close()
    return store.added


def run_on_ray(runner: Runner, runs: list[RunSpec], factory: Callable, factory_kwargs: dict, settings: dict,
               address: Optional[str] = None, gpus: float = 0.0, cpus: float = 1.0, retries: int = 2,
               log=sys.stderr) -> list[Unit]:
    """Run what is left of ``runs`` as Ray tasks; append each task's records to ``runner.store`` as it finishes.

    ``address``: None or "local" starts a local cluster; anything else is passed to ``ray.init``. ``gpus`` and
    ``cpus``: the resources each task declares (a task that needs a GPU waits for one). Returns the units that
    failed after ``retries`` retries (their errors are in the store)."""
    try:
        import ray
    except ImportError:
        raise CompareError("--ray needs Ray: pip install 'memoe_plugin[distributed]' (or pip install ray)") from None
    units = plan_units(runner, runs)
    if not units:
        return []
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    task = ray.remote(run_unit).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                        retry_exceptions=True)
    records = runner.store.records()
    pending = {}
    for unit in units:
        prior = [rec for rec in records if rec.get("run") == unit.run.key]
        pending[task.remote(factory, factory_kwargs, settings, unit, prior)] = unit
    print(f"[memoe-compare] {len(units)} units of work on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs)", file=log)
    failed = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ready[0])
        try:
            runner.store.append(*ray.get(ready[0]))
            print(f"[memoe-compare] done: {unit.name}", file=log)
        except Exception as err:   # retries exhausted: this unit's run records the error, the others go on
            failed.append(unit)
            chunk = unit.chunks[0] if unit.chunks else None
            runner.store.append({"type": "error", "run": unit.run.key, "attempt": "ray", "kind": "error",
                                 "chunk": chunk, "error": f"{type(err).__name__}: {err}",
                                 "traceback": traceback.format_exc(limit=10)})
            print(f"[memoe-compare] {unit.name}: failed on Ray after {retries} retries: {err}", file=log)
    return failed
