"""memoe-tune: the same tuning budget for every method, on the dev split, by one stated criterion.

    memoe-tune --methods FT-L,FT-M,LoRA,GRACE,WISE,MEMIT --trials 12 --data zsre --num-edits 30 \\
               --out runs/tune [--protocol batch|sequential] [--stats-text FILE] [--install]

For each method, ``--trials`` settings are drawn from its search space (:data:`SEARCH_SPACES`:
its layer, learning rate and steps, and its own key settings such as GRACE's ε or WISE's
activation thresholds). The shipped file is always trial 0, so tuning can only keep or improve
the dev score, and no other trial repeats its settings. Each trial is one ``memoe-compare`` run on the
**dev** split, so the records the tables report (test) are never looked at: under ``--protocol batch``
(the default) chunks of 30, each rolled back; under ``--protocol sequential`` chunks of 10 applied one after another with no rollback, all
scored after the last, as the sequential tables are run. The winner is the
trial with the highest **average of reliability, generality and unrelated locality** (ties: the
earlier trial) among the trials that edit: reliability at least :data:`MIN_EDIT_GAIN` points above the
unedited model's on the same records. Without that rule a trial that leaves the model almost as it was
can win on locality alone (a first FT-L search picked 10 steps at lr 1e-4: 14.5 / 18.8 / 100, with the
unedited model at 14.5). When no trial edits, the shipped file stays. Its file is written to ``<out>/tuned/<METHOD>.yaml`` (with ``--install``, also
to the shipped ``hparams/compare/smollm2-135m/``), with a header giving the search, the
criterion and the dev scores. A sequential search starts from, and installs into, the sequential
files (``hparams/compare/smollm2-135m-sequential/``, which ``memoe-compare --protocol sequential``
reads first), so that the batch files stay as they were tuned. ``<out>/tuning.md`` lists every trial.

``--criterion generation`` scores reliability and generality by greedy exact match instead (the trials
run with ``--generation``; the edit rule then compares with the unedited model's exact match): the mean
of exact match on the edit prompt, exact match on its rephrasing, and unrelated locality. It is for
methods whose teacher-forced scores do not see their edits (GRACE replaces only the last position's
activation, DEFER gates on the last input position, which under teacher forcing is the answer's last
token), so that the default criterion would choose among their trials blindly. ``--criterion
same-subject`` adds KnowEdit's same-subject locality (``Relation_Specificity``) as a fourth column, the
average memoe-compare's tables report on KnowEdit data: the default criterion cannot see an edit that
spills onto the subject's other facts. Rerun into the same ``--out`` with another criterion, a search
is chosen among again without rerunning a trial (refused when the trials lack a column it needs).

Trials are resumable: each has its own memoe-compare folder, rerun with ``--resume``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import CompareError
from ...hparams import flatten_sections
from .methods import METHODS, TUNED_MARK, hparams_path_for, parse_methods, sequential_hparams_path
from .plan import DEFAULT_BATCH_SIZE

from .search import (CRITERIA, MIN_EDIT_GAIN, SEARCH_SPACES, TEACHER_FORCED, Criterion,  # noqa: F401
                     checked_spaces, edit_gain, edits, score, select_best, shipped_settings, trial_settings)


def replace_top_level(text: str, key: str, value: Any) -> str:
    """``text`` with the top-level ``key:`` entry (its line and its indented or ``-`` continuation lines)
    replaced by ``key: value``; comments and every other line are kept. Appended when ``key`` is absent."""
    lines = text.splitlines()
    entry = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).rstrip("\n").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{key}:"):
            end = i + 1
            while end < len(lines) and lines[end][:1] in (" ", "\t", "-") and lines[end].strip():
                end += 1
            return "\n".join(lines[:i] + entry + lines[end:]) + "\n"
    return text.rstrip("\n") + "\n" + "\n".join(entry) + "\n"


def protocol_phrase(args) -> str:
    """How a trial ran, for the headers: ``chunks of 30, rolled back`` or ``sequential chunks of 10, no rollback``."""
    if getattr(args, "protocol", "batch") == "sequential":
        return f"sequential chunks of {args.batch_size}, no rollback"
    return f"chunks of {args.batch_size}, rolled back"


def tuned_yaml(method: str, base: Path, settings: dict, row: Optional[dict], trials: int, args,
               criterion: Criterion = TEACHER_FORCED, changed: Optional[dict] = None) -> str:
    """The shipped file, its comments kept, with the winning settings in place and a header saying how."""
    shipped = base.read_text()
    text = "\n".join(line for line in shipped.splitlines()
                     if not (line.startswith("# ") and (TUNED_MARK in line or line.startswith("# Criterion: mean"))))
    text += "\n"
    for key, value in settings.items():
        text = replace_top_level(text, key, value)
    own = method in METHODS and METHODS[method].own_hparams   # MEMoE's file may hold sections: compare flat
    original = yaml.safe_load(shipped)
    if own:
        original = flatten_sections(original)
    expected = {**original, **settings}
    try:
        loaded = yaml.safe_load(text)
        kept = (flatten_sections(loaded) if own else loaded) == expected
    except (yaml.YAMLError, ValueError):
        kept = False
    if not kept:                                     # a layout the line edit cannot handle: plain YAML instead
        text = yaml.safe_dump(expected, sort_keys=False)
    scores = (", ".join(f"{k} {row[k]:.1f}" for k in criterion.columns if row.get(k) is not None)
              if row else "no complete trial")
    header = (f"# {method}, {TUNED_MARK} on the dev split ({args.data}, {args.num_edits} edits, "
              f"{protocol_phrase(args)}): {trials} trials from memoe_plugin.eval.compare.tuning.SEARCH_SPACES"
              f"{' with --space ' + json.dumps(changed) if changed else ''}, "
              f"trial 0 being {base.name} as shipped before.\n# Criterion: mean of {criterion.words} "
              f"({criterion.name}), among trials that raise {criterion.columns[0]} {MIN_EDIT_GAIN:g}+ points over "
              f"the unedited model. Best: {json.dumps(settings) if settings else 'the shipped settings'} ({scores}).\n")
    return header + text


def brief(settings: dict) -> str:
    """Settings for a table cell: a list of module names that differ only in a layer number is shortened to
    its runs (``model.layers.{16..25}.mlp.up_proj``)."""
    def runs(names: list) -> list:
        out: list = []
        for name in names:
            found = re.fullmatch(r"(.*?)(\d+)(\D*)", name) if isinstance(name, str) else None
            if not found:
                return names
            head, number, tail = found[1], int(found[2]), found[3]
            if out and out[-1][0] == head and out[-1][3] == tail and out[-1][2] == number - 1:
                out[-1][2] = number
            else:
                out.append([head, number, number, tail])
        return [f"{h}{{{a}..{b}}}{t}" if a != b else f"{h}{a}{t}" for h, a, b, t in out]
    if not settings:
        return "shipped"
    return json.dumps({k: runs(v) if isinstance(v, list) and len(v) > 2 else v for k, v in settings.items()})


def trial_row(folder: Path) -> Optional[dict]:
    """The summary row of one trial's memoe-compare folder (None before it has one)."""
    summary = folder / "summary.json"
    rows = json.loads(summary.read_text()) if summary.is_file() else []
    return rows[0] if rows else None


CRITERION_FILE = "criterion.txt"       # the criterion the last memoe-tune run into a method's folder chose by
FLAGS_FILE = "trial_flags.txt"          # the memoe-compare flags that folder's trials ran with (one per line)


def recorded_criterion(folder: Path) -> Criterion:
    """The criterion one method's trials under ``<out>/trials/<METHOD>`` were last chosen by (searches made
    before there was a choice have no file: teacher-forced)."""
    path = folder / CRITERION_FILE
    name = path.read_text().strip() if path.is_file() else TEACHER_FORCED.name
    if name not in CRITERIA:
        raise CompareError(f"{path}: unknown criterion {name!r} (one of {', '.join(CRITERIA)})")
    return CRITERIA[name]


def claim_method_folder(folder: Path, criterion: Criterion) -> None:
    """Record that ``criterion`` chooses among the trials in ``folder``. Trials already there may be chosen
    among again by another criterion (a search's trials read once more, nothing rerun) only when they ran
    with every memoe-compare flag that criterion needs (``--generation`` for exact match)."""
    flags_path = folder / FLAGS_FILE
    if any(folder.glob("*/trial.json")):
        ran_with = set(flags_path.read_text().split()) if flags_path.is_file() else set()
        missing = sorted(set(criterion.compare_flags) - ran_with)
        if missing:
            raise CompareError(f"{folder}: its trials ran without {' '.join(missing)}, which the {criterion.name} "
                               f"criterion needs for {', '.join(criterion.columns)}; use another --out")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        flags_path.write_text("".join(f"{flag}\n" for flag in criterion.compare_flags))
    (folder / CRITERION_FILE).write_text(criterion.name + "\n")


def read_trials(folder: Path) -> list[tuple[dict, Optional[dict]]]:
    """One method's finished trials under ``<out>/trials/<METHOD>``, in trial order: ``(settings, row)``."""
    return [(json.loads((trial / "trial.json").read_text()), trial_row(trial))
            for trial in sorted(p for p in folder.iterdir() if (p / "trial.json").is_file())]


def tuning_report(out: Path, args) -> str:
    """``tuning.md``: every method tuned into ``out`` so far (also by other memoe-tune runs), every trial."""
    lines = ["# memoe-tune", "", f"Criterion: the mean of the columns each method's section names, on the dev "
             f"split of {args.data} ({args.num_edits} edits, {protocol_phrase(args)}), among the trials that edit "
             f"(reliability {MIN_EDIT_GAIN:g}+ points above the unedited model's, column 'gain'; when none does, "
             "the shipped file stays). "
             + " ".join(f"{c.name}: mean of {c.words}." for c in CRITERIA.values()), ""]
    methods = [(p.name, read_trials(p), recorded_criterion(p)) for p in sorted((out / "trials").iterdir())
               if p.is_dir()]
    methods = [(name, results, crit, select_best(results, crit)) for name, results, crit in methods if results]

    def scores(r, crit):
        return " / ".join(f"{r[k]:.1f}" if r.get(k) is not None else "–" for k in crit.columns) + \
            f" ({score(r, crit):.1f})" if r else "–"
    lines += ["| method | trials | criterion | shipped: its columns (mean) | tuned | winning settings |",
              "|---|---|---|---|---|---|"]
    for name, results, crit, (best, setting, row) in methods:
        lines.append(f"| {name} | {len(results)} | {crit.name}: {' / '.join(crit.labels)} | "
                     f"{scores(results[0][1], crit)} | {scores(row, crit)} | "
                     f"{brief(setting) if setting else 'the shipped file'} |")
    lines.append("")
    for name, results, crit, (best, _, _) in methods:
        lines += [f"## {name}: trial {best} wins ({crit.name} criterion)", "",
                  f"| trial | settings | {' | '.join(crit.labels)} | criterion | gain |",
                  "|---|---|" + "---|" * len(crit.columns) + "---|---|"]
        for i, (s, r) in enumerate(results):
            cells = [f"{r[k]:.1f}" if r and r.get(k) is not None else "–" for k in crit.columns]
            gain = edit_gain(r, crit)
            gain_cell = "–" if gain is None else f"{gain:+.1f}" + ("" if edits(r, crit) else " (no edit)")
            lines.append(f"| {i}{' (best)' if i == best else ''} | {brief(s)} | "
                         + " | ".join(cells) + f" | {score(r, crit):.1f} | {gain_cell} |")
        lines.append("")
    return "\n".join(lines)


@dataclasses.dataclass
class TuneOptions:
    """One search (what ``memoe-tune``'s options say); :func:`tune_methods` runs it."""
    methods: str = "FT-L,FT-M,LoRA,GRACE,WISE,MEMIT"
    trials: int = 12
    data: str = "zsre"
    num_edits: int = 30
    protocol: str = "batch"
    batch_size: Optional[int] = None
    seed: int = 0
    criterion: str = TEACHER_FORCED.name
    space: list = dataclasses.field(default_factory=list)
    out: str = "runs/tune"
    install: bool = False
    compare_flags: list = dataclasses.field(default_factory=list)   # passed to every trial's memoe-compare


@dataclasses.dataclass
class TuneResult:
    """A method's search: every trial's settings and summary row, the winner's index, and its file."""
    trials: list
    best: int
    settings: dict
    row: Optional[dict]
    tuned_file: Path


def tune(argv: Optional[list[str]] = None, compare_main: Optional[Callable[..., int]] = None,
         backend_factory: Any = None) -> int:
    """The command: parse ``argv`` into :class:`TuneOptions` and run :func:`tune_methods`."""
    options = parse_options(argv)
    tune_methods(options, compare_main, backend_factory)
    return 0


def parse_options(argv: Optional[list[str]] = None) -> TuneOptions:
    parser = argparse.ArgumentParser(prog="memoe-tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="FT-L,FT-M,LoRA,GRACE,WISE,MEMIT")
    parser.add_argument("--trials", type=int, default=12, help="trials per method, the shipped file included")
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--protocol", choices=("batch", "sequential"), default="batch",
                        help="how each trial runs: batch (chunks rolled back, the default) or sequential (no "
                        "rollback, all scored after the last chunk); a sequential search reads and --install "
                        "writes the sequential files")
    parser.add_argument("--batch-size", type=int, help="chunk size (default 30 for batch, 10 for sequential)")
    parser.add_argument("--seed", type=int, default=0, help="which grid points are drawn")
    parser.add_argument("--criterion", choices=tuple(CRITERIA), default=TEACHER_FORCED.name,
                        help="what the winner maximises: teacher-forced (the default: mean of reliability, "
                        "generality and locality) or generation (exact match of the greedy answer on the edit "
                        "prompt and on its rephrasing, and locality; the trials run with --generation), for "
                        "methods whose teacher-forced scores miss their edits (GRACE, DEFER), or same-subject "
                        "(teacher-forced plus KnowEdit's same-subject locality: the tables' average on KnowEdit "
                        "data). A finished search can be chosen among again by another criterion, from the same "
                        "--out: nothing is rerun")
    parser.add_argument("--space", action="append", default=[], metavar="METHOD.key=[v1, v2]",
                        help="replace one list of a method's search space (repeatable), e.g. WISE.n_iter=10 to "
                        "keep a slow method's trials within a time budget; the tuned file's header records it")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--install", action="store_true",
                        help="also write the winners into the shipped hparams/compare/smollm2-135m/")
    args, passthrough = parser.parse_known_args(argv)
    return TuneOptions(**vars(args), compare_flags=passthrough)


def tune_methods(args: TuneOptions, compare_main: Optional[Callable[..., int]] = None,
                 backend_factory: Any = None) -> dict[str, TuneResult]:
    """Run the search ``args`` describes, method by method; write (and with ``install`` install) each winner's
    file and ``tuning.md``; return each method's :class:`TuneResult`."""
    args = dataclasses.replace(args, space=list(args.space), compare_flags=list(args.compare_flags))
    passthrough = args.compare_flags
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE[args.protocol]
    if compare_main is None:
        from .cli import main as compare_main
    methods = parse_methods(args.methods)
    criterion = CRITERIA[args.criterion]
    extra = [flag for flag in criterion.compare_flags if flag not in passthrough]
    out = Path(args.out).expanduser()
    (out / "tuned").mkdir(parents=True, exist_ok=True)
    for method in methods:
        if method not in SEARCH_SPACES:
            raise CompareError(f"{method}: no search space in memoe_plugin.eval.compare.tuning.SEARCH_SPACES")
    spaces = checked_spaces(methods, args.space, args.protocol)
    found = {}
    for method in methods:
        space, changed = spaces[method]
        base = hparams_path_for(method, None, {}, args.protocol)
        target = sequential_hparams_path(method) if args.protocol == "sequential" else base
        settings = trial_settings(space, args.trials, args.seed, shipped_settings(base))
        claim_method_folder(out / "trials" / method, criterion)
        results = []
        for i, setting in enumerate(settings):
            folder = out / "trials" / method / f"{i:02d}"
            command = ["--data", args.data, "--split", "dev", "--num-edits", str(args.num_edits),
                       "--protocol", args.protocol, "--batch-size", str(args.batch_size), "--methods", method,
                       "--hparams", f"{method}={base}", "--out", str(folder), "--no-progress", *extra,
                       *passthrough]
            for key, value in setting.items():
                command += ["--set", f"{method}.{key}={json.dumps(value)}"]
            if (folder / "trial.json").exists() and json.loads((folder / "trial.json").read_text()) != setting:
                raise CompareError(f"{folder} holds a trial with other settings (another --seed or search space); "
                                   "use another --out, or delete that folder")
            if (folder / "results.jsonl").exists():
                command.append("--resume")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "trial.json").write_text(json.dumps(setting))
            kwargs = {"backend_factory": backend_factory} if backend_factory is not None else {}
            code = compare_main(command, **kwargs)
            if code == 2:        # a usage error (bad settings, results made with other settings): stop here
                raise CompareError(
                    f"{method} trial {i} ({folder}): memoe-compare stopped with the error above, so nothing was "
                    f"chosen or installed. (Resuming a search after --install starts from the installed "
                    f"winner, not the file the finished trials used: restore {base}, e.g. with git checkout, "
                    f"or use another --out.)")
            row = trial_row(folder) if code == 0 else None
            results.append((setting, row))
            print(f"[memoe-tune] {method} trial {i}: {json.dumps(setting) or 'shipped'} -> "
                  f"{score(row, criterion):.1f}", file=sys.stderr)
        complete = [row for _, row in results if row and row.get("status") == "complete"]
        absent = sorted({k for k in criterion.columns if complete and all(row.get(k) is None for row in complete)})
        if absent:
            hint = (" (same_subject needs KnowEdit records: --data zsre-knowedit or counterfact-knowedit)"
                    if "same_subject" in absent else "")
            raise CompareError(f"{method}: no trial has {', '.join(absent)}, which the {criterion.name} criterion "
                               f"averages{hint}; nothing was chosen or installed")
        best, setting, row = select_best(results, criterion)
        text = tuned_yaml(method, base, setting, row, len(settings), args, criterion, changed)
        (out / "tuned" / f"{method}.yaml").write_text(text)
        if args.install:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        found[method] = TuneResult(results, best, setting, row, out / "tuned" / f"{method}.yaml")
    report = tuning_report(out, args)
    (out / "tuning.md").write_text(report)
    print(report)
    return found


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return tune(argv)
    except CompareError as err:
        print(f"memoe-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
