"""The methods memoe-compare runs: EasyEdit's name for each, its hparams class, and its settings file."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import yaml

from ...assets import compare_hparams_dir, memoe_hparams
from ..overrides import OverrideError, parse_method_assignments
from .errors import CompareError

PATH_KEYS = ("model_name", "stats_dir", "P_loc", "save_path", "load_path")


@dataclass(frozen=True)
class MethodSpec:
    """One method, and what running it through EasyEdit needs, as data (the backend reads these fields; it
    compares no method names)."""
    name: str                    # the table's name: FT-L
    alg_name: str                # EasyEdit's ALG_DICT key: FT
    hparams_class: str           # attribute of easyeditor, or of memoe_plugin.hparams (own_hparams)
    steps_key: Optional[str]     # what METHOD.steps=N sets
    fixed: tuple = ()            # (key, value) pairs that define the method
    note: str = ""
    unavailable: str = ""        # non-empty: never runnable here, and why
    own_hparams: bool = False    # the hparams class and files are this package's (MEMoE): sections, shipped file
    right_padding: bool = False  # EasyEdit finds the last prompt token as mask.sum() - 1 (needs_right_padding)
    owned_weights: str = ""      # hparams key naming the weights it changes and EasyEdit does not give back
    reset_before_run: tuple = ()  # (module, attribute, value): module state an earlier run must not leave
    chunk_is_batch: bool = False  # it edits requests[:batch_size]: batch_size set to each call's size
    rows_one_at_a_time: bool = False   # its layer broadcasts a batch wrongly: run rows alone (DEFER)
    side_memory_per_chunk: bool = False  # hparams.sequential_edit within a chunk (WISE's side memory)
    checkpointable: bool = False  # sequential runs save and resume its adapter (MEMoE)
    statistics: bool = False      # covariance statistics from text (stats.py) unless mom2_adjustment is off

    def fixed_dict(self) -> dict:
        return dict(self.fixed)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("MEMoE", "MEMoE", "MEMoEHyperParams", "steps", own_hparams=True, checkpointable=True),
    MethodSpec("FT-L", "FT", "FTHyperParams", "num_steps", (("objective_optimization", "prompt_last"),),
               "EasyEdit FT, objective_optimization prompt_last", right_padding=True),
    MethodSpec("FT-M", "FT", "FTHyperParams", "num_steps", (("objective_optimization", "target_new"),),
               "EasyEdit FT, objective_optimization target_new"),
    MethodSpec("LoRA", "LoRA", "LoRAHyperParams", "num_steps"),
    MethodSpec("ROME", "ROME", "ROMEHyperParams", "v_num_grad_steps", statistics=True),
    MethodSpec("MEMIT", "MEMIT", "MEMITHyperParams", "v_num_grad_steps", statistics=True),
    MethodSpec("GRACE", "GRACE", "GraceHyperParams", "n_iter"),
    MethodSpec("WISE", "WISE", "WISEHyperParams", "n_iter", side_memory_per_chunk=True),
    MethodSpec("UltraEdit", "ULTRAEDIT", "UltraEditHyperParams", None, owned_weights="inner_params",
               chunk_is_batch=True),
    MethodSpec("AlphaEdit", "AlphaEdit", "AlphaEditHyperParams", "v_num_grad_steps", statistics=True,
               reset_before_run=(("easyeditor.models.alphaedit.AlphaEdit_main", "cache_c_new", False),)),
    MethodSpec("EMMET", "EMMET", "EMMETHyperParams", "v_num_grad_steps", statistics=True,
               owned_weights="rewrite_module_tmp"),
    MethodSpec("R-ROME", "R-ROME", "R_ROMEHyperParams", "v_num_grad_steps", statistics=True),
    MethodSpec("PMET", "PMET", "PMETHyperParams", "v_num_grad_steps", statistics=True, right_padding=True),
    MethodSpec("DEFER", "DEFER", "DeferHyperParams", "n_iter", rows_one_at_a_time=True),
    MethodSpec("MELO", "MELO", "MELOHyperParams", None, unavailable=(
        "EasyEdit's MELO loads a DistilBERT tokenizer from the Hub (hparams lora.cls_name), which is not available "
        "offline, and restore_after_edit keeps MELO's edited model (KEEP_EDITED_MODEL_ALGS; apply_melo_to_model "
        "returns no weights copy and wraps the model in its own LoRA and GRACE layers in place), so no edit can "
        "be rolled back: measured on a tiny Llama with a local tokenizer. EasyEdit ships MELO settings for "
        "GPT-2 XL only")),
    MethodSpec("SimIE", "SimIE", "SimIEHyperParams", None, unavailable=(
        "EasyEdit's SimIEHyperParams.from_hparams reads its base method's settings from the settings file's path "
        "with '/SimIE/' replaced by '/ROME/'; memoe-compare hands EasyEdit <out>/hparams/SimIE.yaml, so the base "
        "file is the SimIE file itself and ROMEHyperParams rejects it (AssertionError)")),
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
    try:
        out = parse_method_assignments(items, METHODS)
    except OverrideError as err:
        raise CompareError(f"--set {err}") from None
    unused = set(out) - set(methods)
    if unused:
        raise CompareError(f"--set names {sorted(unused)}, which are not in --methods")
    return out


TUNED_MARK = "tuned by memoe-tune"


def hparams_origin(path: Path) -> str:
    """How a file's settings were chosen, read from its header comment: memoe-tune's line, another
    choice on the dev split (MEMoE's files say so), or neither."""
    header = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            break
        header.append(line)
    for line in header:
        if TUNED_MARK in line:
            found = re.search(r"on the dev split \(([^,]+), (\d+) edits.*?: (\d+) trials", line)
            if not found:
                return TUNED_MARK
            protocol = ", sequential" if "sequential chunks" in line else ""
            return f"tuned by memoe-tune ({found[3]} trials, {found[2]} {found[1]} dev edits{protocol})"
    if "dev split" in " ".join(header):
        return "chosen on the dev split (see the file's header)"
    return "as shipped (not tuned by memoe-tune)"


def sequential_hparams_path(method: str) -> Path:
    """Where a method's file for the sequential protocol lives (it may not exist): MEMoE's
    ``smollm2-135m-sequential.yaml``, a baseline's ``hparams/compare/smollm2-135m-sequential/<METHOD>.yaml``
    (written by ``memoe-tune --protocol sequential --install``)."""
    if METHODS[method].own_hparams:
        return memoe_hparams("smollm2-135m").with_name("smollm2-135m-sequential.yaml")
    return compare_hparams_dir("smollm2-135m-sequential") / f"{method}.yaml"


def hparams_path_for(method: str, hparams_dir: Optional[Path], explicit: dict[str, Path],
                     protocol: str = "batch") -> Path:
    """Which YAML a method reads: --hparams METHOD=FILE, else --hparams-dir/METHOD.yaml, else the shipped
    one. Under the sequential protocol the shipped file for that protocol comes first, where one exists
    (:func:`sequential_hparams_path`): files tuned with rollback after each chunk are not files tuned
    without it."""
    if method in explicit:
        return explicit[method]
    if hparams_dir is not None and (hparams_dir / f"{method}.yaml").is_file():
        return hparams_dir / f"{method}.yaml"
    if protocol == "sequential" and sequential_hparams_path(method).is_file():
        return sequential_hparams_path(method)
    if METHODS[method].own_hparams:
        return memoe_hparams("smollm2-135m")
    return compare_hparams_dir("smollm2-135m") / f"{method}.yaml"


def settings_digest(config: dict) -> str:
    """A short digest of a method's effective settings (its YAML with --set and --model applied), stored with
    each run so that ``--resume`` never continues a run with other settings than it started with."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_config(method: str, path: Path, overrides: dict, model: Optional[str],
                 allowed_keys: Optional[Iterable[str]] = None) -> dict:
    """The method's YAML with --set overrides and --model applied, and ``~`` expanded in paths."""
    spec = METHODS[method]
    if not path.is_file():
        raise CompareError(f"{method}: hparams file {path} not found (pass --hparams {method}=FILE or --hparams-dir)")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise CompareError(f"{path}: expected a YAML mapping")
    overrides = dict(overrides or {})
    if spec.own_hparams:   # MEMoE's sections (scope: {threshold: ...}) as the flat keys --set names
        from ...hparams import flatten_sections
        try:
            config, overrides = flatten_sections(config), flatten_sections(overrides)
        except ValueError as err:
            raise CompareError(f"{path}: {err}") from None
    if config.get("alg_name") != spec.alg_name:
        raise CompareError(f"{path}: alg_name is {config.get('alg_name')!r}; {method} needs {spec.alg_name!r}")
    known = set(config) | set(allowed_keys or ())
    for key, value in overrides.items():
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
