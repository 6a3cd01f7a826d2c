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
import itertools
import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..overrides import OverrideError, parse_method_assignments
from .errors import CompareError
from .methods import TUNED_MARK, hparams_path_for, parse_methods, sequential_hparams_path
from .protocol import DEFAULT_BATCH_SIZE

# The main knobs of each method. Values are YAML-able; a list value of a list is one setting.
SEARCH_SPACES: dict[str, dict[str, list]] = {
    "MEMoE": {"layer": [15, 18, 21, 24], "lr": [1e-3, 5e-3, 1e-2], "steps": [50, 100],
              "scope_threshold": [0.3, 0.4, 0.5]},
    "FT-L": {"layers": [[6], [12], [18], [24]], "lr": [1e-4, 5e-4, 1e-3, 5e-3], "num_steps": [10, 25, 50]},
    "FT-M": {"layers": [[6], [12], [18], [24]], "lr": [1e-4, 5e-4, 1e-3, 5e-3], "num_steps": [10, 25, 50]},
    "LoRA": {"lr": [5e-4, 1e-3, 5e-3], "num_steps": [30, 70], "rank": [4, 8, 16]},
    "ROME": {"layers": [[3], [5], [8], [12]], "v_lr": [1e-1, 5e-1], "v_num_grad_steps": [12, 25]},
    "MEMIT": {"layers": [[2, 3, 4, 5, 6], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]], "v_lr": [1e-1, 5e-1],
              "mom2_update_weight": [5000, 15000, 30000], "v_num_grad_steps": [12, 25]},
    "GRACE": {"inner_params": [[f"model.layers[{n}].mlp.down_proj.weight"] for n in (12, 18, 25)],
              "eps": [1.0, 10.0, 50.0, 100.0], "edit_lr": [0.5, 1.0], "n_iter": [50, 100]},
    "WISE": {"inner_params": [[f"model.layers[{n}].mlp.down_proj.weight"] for n in (18, 25)],
             "act_ratio": [0.7, 0.88], "mask_ratio": [0.2, 0.5], "edit_lr": [0.5, 1.0],
             "act_margin": [[5.0, 20.0, 10.0], [2.5, 10.0, 5.0]], "n_iter": [10, 30]},
    # AlphaEdit keeps MEMIT's layers 4-8: each further layer needs its own covariance statistics (1-5 min
    # per layer on one core of the 2-core machine), which the search budget here did not cover.
    "AlphaEdit": {"v_lr": [1e-1, 5e-1], "v_num_grad_steps": [12, 25], "nullspace_threshold": [1e-2, 2e-2],
                  "L2": [1, 10]},
    "UltraEdit": {"inner_params": [
        [f"model.layers.{n}.mlp.{p}" for n, p in [(10, "gate_proj"), (11, "gate_proj"), (12, "gate_proj"), (13, "gate_proj"),
                                                   (14, "gate_proj"), *((n, "up_proj") for n in range(16, 23))]],
        [f"model.layers.{n}.mlp.up_proj" for n in range(16, 26)],
        [f"model.layers.{n}.mlp.down_proj" for n in range(18, 28)]],
        "lr": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]},
    "EMMET": {"layers": [[5], [8], [4, 5, 6, 7, 8]], "v_lr": [1e-1, 5e-1], "emmet_lambda": [0.1, 1.0],
              "mom2_update_weight": [15000, 100000]},
    "R-ROME": {"layers": [[3], [5], [8], [12]], "v_lr": [1e-1, 5e-1], "v_num_grad_steps": [12, 25]},
    "PMET": {"layers": [[2, 3, 4, 5, 6], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]], "v_lr": [1e-1, 5e-1],
             "v_num_grad_steps": [10, 20]},
    "DEFER": {"inner_params": [[f"model.layers[{n}].mlp.down_proj.weight"] for n in (18, 25)],
              "edit_lr": [7e-5, 1e-4, 1e-3], "n_iter": [50, 100], "threshold": [0.3, 0.5, 0.7]},
}


@dataclasses.dataclass(frozen=True)
class Criterion:
    """What a search maximises: the mean of ``columns`` of a trial's summary row, among the trials whose
    ``columns[0]`` (reliability) is :data:`MIN_EDIT_GAIN` points above the unedited model's (``pre``)."""
    name: str
    columns: tuple[str, ...]
    pre: str
    labels: tuple[str, ...]
    words: str                          # for headers: "mean of <words>"
    compare_flags: tuple[str, ...] = ()  # what each trial's memoe-compare run needs to fill the columns


TEACHER_FORCED = Criterion("teacher-forced", ("reliability", "generality", "locality"), "pre_reliability",
                           ("Rel.", "Gen.", "Loc."), "reliability, generality and locality")
GENERATION = Criterion("generation", ("gen_em", "gen_em_rephrase", "locality"), "pre_gen_em",
                       ("EM", "Gen. EM", "Loc."),
                       "greedy exact match on the edit prompt, exact match on its rephrasing, and locality",
                       ("--generation",))
SAME_SUBJECT = Criterion("same-subject", ("reliability", "generality", "locality", "same_subject"),
                         "pre_reliability", ("Rel.", "Gen.", "Loc.", "Same subj."),
                         "reliability, generality, locality and same-subject locality (KnowEdit data only)")
CRITERIA = {c.name: c for c in (TEACHER_FORCED, GENERATION, SAME_SUBJECT)}
# A trial edits when its reliability is this many points above the unedited model's (EasyEdit's "pre"
# rewrite_acc on the same records); trials that edit are preferred to trials that do not.
MIN_EDIT_GAIN = 10.0


def score(row: Optional[dict], criterion: Criterion = TEACHER_FORCED) -> float:
    """The criterion: by default the mean of reliability, generality and unrelated locality (-inf if a run
    failed or lacks one of the columns)."""
    if not row or row.get("status") != "complete" or any(row.get(k) is None for k in criterion.columns):
        return float("-inf")
    return sum(row[k] for k in criterion.columns) / len(criterion.columns)


def same_setting(a: Any, b: Any) -> bool:
    """Whether two hparam values are the same setting: lists element by element, numbers by value, so
    that YAML's ``5e-1`` (which PyYAML reads as a string) equals the grid's ``0.5``."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same_setting(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def is_shipped(point: dict, shipped: Optional[dict]) -> bool:
    """Whether a grid point only repeats the shipped file, which trial 0 already runs."""
    return shipped is not None and all(k in shipped and same_setting(v, shipped[k]) for k, v in point.items())


def shipped_settings(path: Path) -> Optional[dict]:
    """The top-level settings of a shipped hparams file (None when it cannot be read: nothing is kept out)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def trial_settings(space: dict[str, list], trials: int, seed: int = 0,
                   shipped: Optional[dict] = None) -> list[dict]:
    """Trial 0 is ``{}`` (the shipped file); then ``trials - 1`` distinct points of the grid, drawn reproducibly.

    ``shipped`` (the shipped file's hparams) keeps out the grid point that repeats it, so that no trial
    of the budget runs trial 0 again; the draw is otherwise the same, so a search that never met that
    point is unchanged. The draw is prefix-stable: the first k trials are the same for every
    ``trials >= k``, so a smaller budget is a prefix of a larger one and a search can be extended (or
    cut) and resumed. (The draw is the partial Fisher-Yates shuffle of ``random.sample``'s pool method,
    which is prefix-stable itself, whereas ``random.sample`` switches methods with the sample size.)"""
    if trials < 1:
        raise CompareError("--trials must be at least 1")
    keys = sorted(space)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if len(grid) <= trials - 1:
        return [{}] + [point for point in grid if not is_shipped(point, shipped)]
    rng, pool = random.Random(seed), list(grid)
    chosen = []
    for i in range(len(pool)):
        if len(chosen) == trials - 1:
            break
        j = rng.randrange(len(pool) - i)
        if not is_shipped(pool[j], shipped):
            chosen.append(pool[j])
        pool[j] = pool[len(pool) - i - 1]
    return [{}] + chosen


def search_space(method: str, items: list[str]) -> tuple[dict[str, list], dict[str, list]]:
    """``(space, changed)``: ``method``'s grid in :data:`SEARCH_SPACES` with the ``--space METHOD.key=[v1, v2]``
    items that name it in place of (or beside) its own lists, and those changed lists alone (for the headers).

    A value is a YAML list of settings; a plain value is one setting (``WISE.n_iter=10``), so a setting that
    is itself a list needs its own brackets (``GRACE.inner_params=[[model.layers[12].mlp.down_proj.weight]]``).
    A narrowed space is a different grid, so its draw differs from the full space's."""
    try:
        by_method = parse_method_assignments(items, SEARCH_SPACES)
    except OverrideError as err:
        raise CompareError(f"--space {err}") from None
    changed = {key: value if isinstance(value, list) else [value]
               for key, value in by_method.get(method, {}).items()}
    for key, values in changed.items():
        if not values:
            raise CompareError(f"--space {method}.{key}: give at least one setting, e.g. {method}.{key}=[1, 2]")
    return {**SEARCH_SPACES[method], **changed}, changed


def checked_spaces(methods: list[str], items: list[str], protocol: str) -> dict[str, tuple[dict, dict]]:
    """:func:`search_space` of each method, refusing before any trial runs (an unknown key would only fail at
    trial 1, after trial 0 ran) an item that names a method not tuned here or a key its hparams file lacks."""
    spaces = {method: search_space(method, items) for method in methods}
    tuned_here = {m.lower() for m in methods}
    stray = sorted({item.partition(".")[0] for item in items if item.partition(".")[0].lower() not in tuned_here})
    if stray:
        raise CompareError(f"--space names {', '.join(stray)}, which --methods ({', '.join(methods)}) does not tune")
    for method, (_, changed) in spaces.items():
        known = set(SEARCH_SPACES[method]) | set(shipped_settings(hparams_path_for(method, None, {}, protocol)) or {})
        unknown = sorted(set(changed) - known)
        if unknown:
            raise CompareError(f"--space {method}.{unknown[0]}: not a setting of {method}'s hparams file; its "
                               f"search space has {', '.join(sorted(SEARCH_SPACES[method]))}")
    return spaces


def edit_gain(row: Optional[dict], criterion: Criterion = TEACHER_FORCED) -> Optional[float]:
    """Reliability (the criterion's first column) minus the unedited model's on the same records, in points
    (None when either is missing)."""
    column = criterion.columns[0]
    if not row or row.get(column) is None or row.get(criterion.pre) is None:
        return None
    return row[column] - row[criterion.pre]


def edits(row: Optional[dict], criterion: Criterion = TEACHER_FORCED) -> bool:
    """Whether a trial changed what the model answers: :func:`edit_gain` of at least :data:`MIN_EDIT_GAIN`
    (a row without the unedited score, from an older run, counts as editing)."""
    gain = edit_gain(row, criterion)
    return gain is None or gain >= MIN_EDIT_GAIN


def select_best(results: list[tuple[dict, Optional[dict]]],
                criterion: Criterion = TEACHER_FORCED) -> tuple[int, dict, Optional[dict]]:
    """``(index, settings, row)`` of the best trial by :func:`score` among the trials that :func:`edits`;
    ties go to the earlier trial. When no trial edits, trial 0 (the shipped file) stays."""
    if not results:
        raise CompareError("no trials to choose from")
    if not any(edits(row, criterion) for _, row in results):
        return 0, results[0][0], results[0][1]
    best = max(range(len(results)),
               key=lambda i: (edits(results[i][1], criterion), score(results[i][1], criterion), -i))
    return best, results[best][0], results[best][1]


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
    original = yaml.safe_load(shipped)
    if isinstance(original, dict) and original.get("alg_name") == "MEMoE":   # sections as flat keys
        from ...hparams import flatten_sections
        original = flatten_sections(original)
    expected = {**original, **settings}
    try:
        loaded = yaml.safe_load(text)
        if isinstance(loaded, dict) and loaded.get("alg_name") == "MEMoE":
            from ...hparams import flatten_sections
            loaded = flatten_sections(loaded)
        kept = loaded == expected
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


def tune(argv: Optional[list[str]] = None, compare_main: Optional[Callable[..., int]] = None,
         backend_factory: Any = None) -> int:
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
    report = tuning_report(out, args)
    (out / "tuning.md").write_text(report)
    print(report)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return tune(argv)
    except CompareError as err:
        print(f"memoe-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
