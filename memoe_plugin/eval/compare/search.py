"""memoe-tune's search: each method's space, the trials drawn from it, and how the winner is chosen."""
from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from typing import Any, Optional

import yaml

from ...hparams import flatten_sections
from ..overrides import OverrideError, parse_method_assignments
from .errors import CompareError
from .methods import METHODS, hparams_path_for


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
    """The top-level settings of a shipped hparams file, MEMoE's sections as flat keys (None when it cannot be
    read: nothing is kept out)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            return None
        own = any(spec.own_hparams and spec.alg_name == data.get("alg_name") for spec in METHODS.values())
        return flatten_sections(data) if own else data
    except (OSError, yaml.YAMLError, ValueError):
        return None


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
