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

The protocols are in :mod:`.protocol`; docs/compare.md has the options and results.

Outputs in ``--out``: ``results.jsonl`` (one line per scored case, per chunk,
per error; appended and fsynced as produced, so an interrupted run loses at most
the chunk in progress and ``--resume`` continues after the last finished chunk),
``summary.md`` / ``.csv`` / ``.json`` / ``.png``, ``hparams/<METHOD>.yaml`` (the
exact settings used) and EasyEdit's own ``logs/``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ..data import DATA_FILES, DataNotFoundError, data_file
from .easyedit_backend import EasyEditBackend
from .errors import CompareError
from .methods import DEFAULT_METHODS, METHODS, hparams_path_for, parse_methods, parse_overrides
from .plan import DEFAULT_BATCH_SIZE, RunSpec
from .protocol import Runner
from .report import summarise, write_summary
from .store import RESULTS_FILE, ResultStore


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
    parser.add_argument("--data-file", help="the data file (one dataset only). Default: the dataset's file in "
                        "$MEMOE_DATA, else in the EasyEdit checkout's data/ folder")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--hparams-dir", help="directory with <METHOD>.yaml files that replace the shipped ones "
                        "(shipped: hparams/compare/smollm2-135m/, and for --protocol sequential first "
                        "hparams/compare/smollm2-135m-sequential/ and MEMoE's smollm2-135m-sequential.yaml)")
    parser.add_argument("--hparams", action="append", default=[], metavar="METHOD=FILE",
                        help="one method's hparams file (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.key=value", dest="overrides",
                        help="override one hparam (repeatable); METHOD.steps maps to the method's step count")
    parser.add_argument("--protocol", choices=("batch", "sequential"), default="batch")
    parser.add_argument("--batch-size", help="chunk size (default 30 for batch, 10 for sequential); several "
                        "comma-separated, e.g. 10,100,1000 (paper Table 4), give one run each")
    parser.add_argument("--generation", action="store_true",
                        help="also score greedy generation of the answer (exact match, token F1) after the edit "
                        "prompt and its rephrasing, on the edited model before rollback")
    parser.add_argument("--wild", action="store_true",
                        help="also score WILD-style answers (the real-world evaluation of arXiv 2502.11177, offline): "
                        "greedy decoding to a natural stop ('.', newline, end of sequence), exact match with the "
                        "target, with and without a short instruction in front of the prompt")
    parser.add_argument("--chat", action="store_true",
                        help="also ask the edit prompt, its rephrasing and the unrelated prompt through the "
                        "tokenizer's chat template (its default system turn, one user turn, the generation prompt), "
                        "greedy replies of up to 32 tokens: an edit counts when its reply contains the new answer, "
                        "the unrelated reply when it is the unedited model's")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run each independent unit of work (a batch run's chunk, a sequential run) as a Ray "
                        "task: on a local cluster (no ADDRESS), on the cluster `ray start` made (auto), or at "
                        "ADDRESS (ray://host:10001). Results stream into the same results.jsonl; --resume works "
                        "across both modes. Needs the [distributed] extra")
    parser.add_argument("--ray-gpus", type=float, default=0.0, metavar="N",
                        help="GPUs each Ray task declares (default 0: CPU tasks)")
    parser.add_argument("--ray-cpus", type=float, default=1.0, metavar="N", help="CPUs each Ray task declares")
    parser.add_argument("--probes", type=int, default=0, metavar="N",
                        help="general-ability probes: N items per task (0: off), scored on the unedited model and "
                        "after the first chunk of edits; see --probes-dir")
    parser.add_argument("--fluency", action="store_true",
                        help="also score fluency on neutral text written for the project: n-gram entropy of greedy "
                        "continuations and perplexity, on the unedited model and after the first chunk (after the "
                        "last, sequential)")
    parser.add_argument("--probes-dir", help="folder of the probe files (default $MEMOE_PROBES, else $MEMOE_DATA/general)")
    parser.add_argument("--probe-tasks", help="comma-separated subset of the probe tasks (default: all)")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--split", choices=("all", "dev", "test"), default="all",
                        help="which records: the dev or test split (memoe_plugin.eval.splits: a hash of the edit "
                        "prompt, one in five is dev), or all, in file order (default all). Tune on dev, report on test")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed, each drawing its own "
                        "--num-edits records from the split and seeding the methods; the summary gives mean ± sd")
    parser.add_argument("--strict", action="store_true",
                        help="stop before the first edit if any record of the split cannot be used (default: list "
                        "and skip them)")
    parser.add_argument("--eval-every-step", action="store_true",
                        help="sequential: also score all edits so far after every chunk")
    parser.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                        help="sequential: save MEMoE's adapter (with its memory, keys and edit list) every N chunks "
                        "under <out>/checkpoints, so --resume continues a crashed run from there (default 10; 0: off)")
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


def plan_runs(datasets: list[str], methods: list[str], protocol: str, batch_size, num_edits: int,
              eval_every_step: bool, split: str = "all", seeds: Optional[list[int]] = None) -> list[RunSpec]:
    sizes = batch_size if isinstance(batch_size, (list, tuple)) else [batch_size]
    return [RunSpec(d, m, protocol, size, num_edits, eval_every_step, split, seed)
            for seed in (seeds or [None]) for size in sizes for d in datasets for m in methods]


def parse_batch_sizes(text: Optional[str], protocol: str) -> list[int]:
    if not text:
        return [DEFAULT_BATCH_SIZE[protocol]]
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--batch-size {text!r}: expected an integer or comma-separated integers") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise CompareError(f"--batch-size {text!r}: sizes must be positive")
    return sizes


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise CompareError(f"--seeds {text!r}: give each seed once")
    return seeds


def main(argv: Optional[list[str]] = None, backend_factory: Optional[Callable[..., Any]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        for name, spec in METHODS.items():
            path = hparams_path_for(name, None, {})
            state = f"unavailable: {spec.unavailable}" if spec.unavailable else str(path)
            print(f"{name:10s} EasyEdit {spec.alg_name:10s} {state}")
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
    try:
        data_files = {d: data_file(d, args.data_file, args.easyedit) for d in datasets}
    except DataNotFoundError as err:
        raise CompareError(str(err)) from None
    methods = parse_methods(args.methods)
    overrides = parse_overrides(args.overrides, methods)
    explicit = {}
    for item in args.hparams:
        if "=" not in item:
            raise CompareError(f"--hparams {item!r}: expected METHOD=FILE")
        name, file = item.split("=", 1)
        explicit[parse_methods(name)[0]] = Path(file).expanduser().resolve()
    hparams_dir = Path(args.hparams_dir).expanduser().resolve() if args.hparams_dir else None
    hparams_paths = {m: hparams_path_for(m, hparams_dir, explicit, args.protocol) for m in methods}
    batch_sizes = parse_batch_sizes(args.batch_size, args.protocol)
    runs = plan_runs(datasets, methods, args.protocol, batch_sizes, args.num_edits, args.eval_every_step,
                     args.split, parse_seeds(args.seeds))
    probe_items = None
    if args.probes:
        from ..probes import ProbesNotFoundError, load_probes, probe_folder
        try:
            tasks = [t.strip() for t in args.probe_tasks.split(",")] if args.probe_tasks else None
            probe_items = load_probes(probe_folder(args.probes_dir), args.probes, tasks)
        except (ProbesNotFoundError, ValueError) as err:
            raise CompareError(str(err)) from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    stats_text = Path(args.stats_text).expanduser().resolve() if args.stats_text else None
    model = str(Path(args.model).expanduser().resolve()) if args.model else None
    factory = backend_factory or EasyEditBackend
    if args.checkpoint_every < 0:
        raise CompareError("--checkpoint-every must be >= 0 (0: no checkpoints)")
    runner = Runner(None, store, resume=args.resume, progress=not args.no_progress,
                    checkpoint_every=args.checkpoint_every, checkpoint_dir=out_dir / "checkpoints",
                    generation=args.generation, probe_items=probe_items, wild=args.wild, fluency=args.fluency,
                    chat=args.chat)
    if not args.resume:
        runner.check_fresh(runs)
    with commands_file.open("a") as handle:
        handle.write(command + "\n")
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    interrupted = False
    factory_kwargs = dict(easyedit_path=args.easyedit, data_files=data_files, hparams_paths=hparams_paths,
                          overrides=overrides, model=model, out_dir=out_dir, stats_text=stats_text,
                          verbose=args.verbose, strict=args.strict)
    with open(log_dir / "easyedit-stdout.log", "a", buffering=1) as log:
        try:
            runner.resume = True     # freshness was checked above
            if args.ray is not None:
                from .distributed import run_on_ray
                settings = dict(checkpoint_every=args.checkpoint_every, checkpoint_dir=out_dir / "checkpoints",
                                generation=args.generation, probe_items=probe_items, wild=args.wild,
                                fluency=args.fluency, chat=args.chat, threads=args.threads)
                run_on_ray(runner, runs, factory, factory_kwargs, settings, address=args.ray, gpus=args.ray_gpus,
                           cpus=args.ray_cpus)
            else:
                runner.backend, runner.log = factory(**factory_kwargs), (None if args.verbose else log)
                for run in runs:
                    runner.run_one(run)
        except KeyboardInterrupt:
            interrupted = True
            print("\n[memoe-compare] interrupted; finished chunks are in results.jsonl. "
                  "Continue with the same command plus --resume.", file=sys.stderr)
    rows = summarise(store.records())
    paths = write_summary(out_dir, rows, methods, _read_commands(commands_file))
    print(paths["md"].read_text())
    print(f"[memoe-compare] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 130 if interrupted else 0


def _read_commands(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    sys.exit(main())
