"""The real backend: records, edits, scores and rollback all through an EasyEdit checkout.

Records come from EasyEdit's ``ZsreDataset`` / ``CounterFactDataset``, requests from its
``_prepare_requests``, edits from its ``ALG_DICT`` apply functions (through
``BaseEditor``), scores from ``compute_edit_quality`` + ``finalize_locality_metrics``,
rollback from ``restore_after_edit``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Optional

import yaml

from .errors import CompareError
from .methods import METHODS, MethodSpec, build_config, hparams_origin, settings_digest
from .plan import RunSpec
from .requests import DATASET_NEEDS, PreparedRecords, combine_restore, prepare_records
from .stats import ensure_stats


class EasyEditBackend:
    """Loads records and opens one BaseEditor per method, all through an EasyEdit checkout."""

    def __init__(self, easyedit_path: Optional[str], data_files: dict[str, Path], hparams_paths: dict[str, Path],
                 overrides: dict[str, dict], model: Optional[str], out_dir: Path,
                 stats_text: Optional[Path] = None, verbose: bool = False, strict: bool = False):
        import memoe_plugin
        try:
            memoe_plugin.register(easyedit_path)
        except memoe_plugin.EasyEditNotFoundError as err:
            raise CompareError(str(err)) from None
        import easyeditor
        self.ee = easyeditor
        self.data_files, self.hparams_paths, self.overrides = data_files, hparams_paths, overrides
        self.model, self.out_dir, self.stats_text, self.verbose = model, Path(out_dir), stats_text, verbose
        self.strict = strict
        self._records: dict[tuple, tuple] = {}
        if not verbose:
            _quiet_easyedit_logging()

    def records(self, dataset: str, num_edits: int, split: str = "all", seed: Optional[int] = None) -> PreparedRecords:
        key = (dataset, num_edits, split, seed)
        if key not in self._records:
            raw = load_records(self.ee, dataset, self.data_files[dataset])
            self._records[key] = prepare_records(raw, num_edits, split, seed, DATASET_NEEDS.get(dataset, ()),
                                                 self.strict)
        return self._records[key]

    def _config(self, method: str, seed: Optional[int] = None):
        """``(hparams class, effective config)``: the method's YAML with --set, --model and the run's seed."""
        spec = METHODS[method]
        if spec.own_hparams:
            from ... import hparams as own
            cls = getattr(own, spec.hparams_class)
            allowed = [f.name for f in dataclasses.fields(cls)]
        else:
            cls = getattr(self.ee, spec.hparams_class)
            allowed = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        overrides = dict(self.overrides.get(method, {}))
        if seed is not None and "seed" in allowed:
            overrides.setdefault("seed", seed)
        return cls, build_config(method, self.hparams_paths[method], overrides, self.model, allowed)

    def settings_digest(self, run: RunSpec) -> str:
        """:func:`settings_digest` of the settings ``run`` would edit with (read from its files, nothing loaded)."""
        return settings_digest(self._config(run.method, run.seed)[1])

    def hparams(self, method: str, seed: Optional[int] = None):
        cls, config = self._config(method, seed)
        path = self.out_dir / "hparams" / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {method}: effective hparams (from {self.hparams_paths[method]})\n"
                        + yaml.safe_dump(config, sort_keys=False))
        return cls.from_hparams(str(path)), path

    def origin(self, method: str) -> str:
        """How the method's settings were chosen (the file's header), and which --set changed them."""
        changed = sorted(self.overrides.get(method, {}))
        return hparams_origin(self.hparams_paths[method]) + (f", with --set {', '.join(changed)}" if changed else "")

    def open_method(self, run: RunSpec) -> "EasyEditSession":
        hparams, path = self.hparams(run.method, run.seed)
        _seed(42 if run.seed is None else run.seed)
        with _working_directory(self.out_dir):   # BaseEditor opens logs/run.log in the working directory
            editor = self.ee.BaseEditor.from_hparams(hparams)
        if not self.verbose:
            _quiet_easyedit_logging()
        spec = METHODS[run.method]
        session = EasyEditSession(self.ee, editor, run, path,
                                  self.records(run.dataset, run.num_edits, run.split, run.seed),
                                  origin=self.origin(run.method), spec=spec)
        if spec.side_memory_per_chunk:
            hparams.sequential_edit = True    # WISE.py: reuse the side memory across the requests of a chunk
        if needs_right_padding(spec):
            editor.tok.padding_side = "right"
        if spec.statistics and getattr(hparams, "mom2_adjustment", True):
            ensure_stats(editor, hparams, self.stats_text)
        return session


def needs_right_padding(spec: MethodSpec) -> bool:
    """Methods whose EasyEdit code finds a prompt's last token as ``attention_mask.sum(1) - 1``, which holds
    only with right padding, but that BaseEditor pads on the left (it pads on the right only for the ROME
    family it lists: ROME, MEMIT, EMMET, R-ROME, AlphaEdit, ...). EasyEdit's scorers read the padding side.

    - PMET: ``compute_zs`` finds the subject token as if unpadded; with left padding every update was NaN.
    - FT-L (``FT`` with ``objective_optimization: prompt_last``, ``ft_main.execute_ft``): with left padding
      its loss sits on a pad or mid-prompt position of every prompt shorter than the chunk's longest. This
      alone does not make FT-L edit SmolLM2 in chunks of 30 (docs/compare.md): its loss asks the last prompt
      position for every target token at once, the padded targets' pads included.
    """
    return spec.right_padding


def defer_one_row_at_a_time(model) -> int:
    """Make every DEFER layer in ``model`` run each sequence of a batch on its own; returns how many it wrapped.

    EasyEdit's ``DeferAdaptor.forward`` (models/defer/DEFER.py) evaluates
    ``torch.where(defer >= threshold, values, layer_out)`` with shapes (B, 1), (B, D) and (B, T, D). These
    broadcast as DEFER means only for B = 1: with B > 1 the batch dimension meets the time dimension, and
    EasyEdit's own scorer, which feeds KnowEdit's same-subject and portability prompts as one batch, stops
    (``The size of tensor a (2) must match the size of tensor b (11)``). Running the rows one by one gives
    each the output the layer gives that sequence alone (its left padding kept, so its last position is its
    last token). The base layer and DEFER's weights are untouched, and the wrapper leaves with the layer when
    DEFER's ``reset_layer`` puts the original back.
    """
    import torch
    wrapped = 0
    for module in model.modules():
        if type(module).__name__ != "DeferAdaptor" or getattr(module, "_memoe_rowwise", False):
            continue
        forward = module.forward

        def rowwise(hidden, *rest, _forward=forward):
            if hidden.dim() != 3 or hidden.shape[0] == 1:
                return _forward(hidden, *rest)
            return torch.cat([_forward(hidden[i:i + 1], *rest) for i in range(hidden.shape[0])], dim=0)

        module.forward, module._memoe_rowwise = rowwise, True
        wrapped += 1
    return wrapped


class EasyEditSession:
    """One method on one BaseEditor: thin calls into EasyEdit."""

    def __init__(self, easyeditor, editor, run: RunSpec, hparams_path: Path, prepared: PreparedRecords,
                 origin: str = "", spec: Optional[MethodSpec] = None):
        from easyeditor.editors import utils as editor_utils
        from easyeditor.editors.batch_editor import BatchEditor
        from easyeditor.editors.editor import finalize_locality_metrics
        from easyeditor.evaluate import compute_edit_quality
        self.editor, self.run, self.hparams_path, self.origin = editor, run, hparams_path, origin
        self.records, self.skipped = (prepared.edits, prepared.loc_prompts), prepared.skipped
        self._utils, self._compute, self._finalize = editor_utils, compute_edit_quality, finalize_locality_metrics
        self.alg_name = editor.alg_name
        self.spec = spec or METHODS[run.method]
        self.batchable = bool(BatchEditor.is_batchable_method(self.alg_name))
        if self.batchable:
            editor.hparams.batch_size = run.batch_size
        elif hasattr(editor.hparams, "batch_size"):
            editor.hparams.batch_size = 1      # EasyEdit's single-edit contract

    @property
    def model(self):
        return self.editor.model

    def describe(self) -> dict:
        return {"file": str(self.hparams_path), "alg_name": self.alg_name, "origin": self.origin}

    def batch_edit(self, kwargs: dict) -> list[dict]:
        self.editor.hparams.batch_size = len(kwargs["prompts"])
        self._start_on_unedited_model()
        own = self._own_copy()
        try:
            metrics, _, _ = self.editor.batch_edit(**kwargs, sequential_edit=False, verbose=False)
        finally:
            if own:
                self._utils.restore_after_edit(self.editor, self.editor.model, own)
        return metrics

    def _own_copy(self) -> dict:
        """Copies of the weights ULTRAEDIT and EMMET change, which EasyEdit does not give back: ULTRAEDIT looks
        parameter names up in inner_params after stripping '.weight' from them, and apply_emmet_to_model drops its
        copy unless keep_original_weight=True, which BaseEditor.batch_edit never passes."""
        hp, owned = self.editor.hparams, self.spec.owned_weights
        if owned == "inner_params":
            names = [n if n.endswith(".weight") else f"{n}.weight" for n in hp.inner_params]
        elif owned == "rewrite_module_tmp":
            names = [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers]
        else:
            return {}
        params = dict(self.editor.model.named_parameters())
        return {name: params[name].detach().clone() for name in names}

    def _start_on_unedited_model(self) -> None:
        """Module state a method keeps across calls (AlphaEdit keeps the keys of all earlier edits, module global
        cache_c, to protect them): edits that were rolled back (batch protocol) or belong to another run must not
        constrain this one (``MethodSpec.reset_before_run``)."""
        import importlib
        for module, attribute, value in self.spec.reset_before_run:
            setattr(importlib.import_module(module), attribute, value)

    def prepare(self, kwargs: dict) -> list[dict]:
        kwargs = dict(kwargs)
        prompts, target_new, ground_truth = kwargs.pop("prompts"), kwargs.pop("target_new"), kwargs.pop("ground_truth")
        ground_truth = self._utils.normalize_ground_truths(ground_truth, prompts)
        return self._utils._prepare_requests(prompts, target_new, ground_truth,
                                             rephrase_prompts=kwargs.pop("rephrase_prompts"),
                                             locality_inputs=kwargs.pop("locality_inputs"), **kwargs)

    def evaluate(self, model, request: dict) -> dict:
        """EasyEdit's ``compute_edit_quality`` on one request.

        EasyEdit scores GRACE by greedy generation (``vanilla_generation``), and its scorer compares
        the target's tokens with the last ``len(target)`` tokens of prompt plus generation. When the
        generation stops at the end-of-sequence token and prompt plus generation are shorter than a
        long portability answer, numpy cannot broadcast the two and the whole run would stop. Then
        the request is scored again without its portability prompts, which count as unscored
        (``metric["portability_unscored"]`` says why); every other column is EasyEdit's own.
        """
        hp = self.editor.hparams
        try:
            return self._compute(model, self.editor.model_name, hp, self.editor.tok, request, hp.device)
        except ValueError as err:
            if not request.get("portability") or "broadcast" not in str(err):
                raise
            reason = f"EasyEdit could not score its portability prompts: {err}"
        metric = self._compute(model, self.editor.model_name, hp, self.editor.tok,
                               {k: v for k, v in request.items() if k != "portability"}, hp.device)
        metric["portability_unscored"] = reason
        return metric

    def apply(self, requests: list[dict], handle):
        """Edit ``editor.model`` with ``requests`` as EasyEdit's batch_edit (batchable) or edit (one by one) does."""
        editor, seconds, edited = self.editor, 0.0, None
        if handle is None:
            self._start_on_unedited_model()
        own = self._own_copy()
        if own:
            handle = combine_restore(handle, own, self._utils.CALLABLE_RESTORE_ALGS, self.alg_name)
        if self.spec.chunk_is_batch:
            editor.hparams.batch_size = len(requests)   # it edits requests[:batch_size] and needs that many
        groups = [requests] if self.batchable else [[r] for r in requests]
        for group in groups:
            start = time.perf_counter()
            edited, weights_copy = editor.apply_algo(editor.model, editor.tok, group, editor.hparams, copy=False,
                                                     return_orig_weights=True, keep_original_weight=False,
                                                     train_ds=None)
            seconds += time.perf_counter() - start
            handle = combine_restore(handle, weights_copy, self._utils.CALLABLE_RESTORE_ALGS, self.alg_name)
            if self.spec.rows_one_at_a_time:
                defer_one_row_at_a_time(edited)
            if self.batchable:
                editor.model = edited        # as batch_edit(sequential_edit=True)
        return edited, handle, seconds

    def restore(self, edited, handle) -> None:
        self._utils.restore_after_edit(self.editor, edited, handle)

    def finalize(self, metric: dict, request: dict) -> None:
        self._finalize(metric, request, self.editor.hparams, self.editor.model_name)

    def generation_scores(self, model, request: dict) -> dict:
        from ..generation import generation_scores
        return generation_scores(model, self.editor.tok, request)

    def wild_scores(self, model, request: dict) -> dict:
        from ..generation import wild_scores
        return wild_scores(model, self.editor.tok, request)

    def chat_scores(self, model, request: dict, before: Optional[dict] = None) -> dict:
        from ..generation import chat_scores
        return chat_scores(model, self.editor.tok, request, before)

    def probe(self, model, items) -> dict:
        from ..probes import score_probes
        # DEFER's layer gates on the last input position; the probes pad on the right, so each option is
        # scored unpadded, where the last position is the option's last token
        return score_probes(model, self.editor.tok, items, one_at_a_time=self.spec.rows_one_at_a_time)

    def fluency(self, model) -> dict:
        from ..fluency import score_fluency
        return score_fluency(model, self.editor.tok)   # unpadded, one text at a time (fits DEFER's gating too)

    @property
    def can_checkpoint(self) -> bool:
        """Whether a sequential run of this method can be checkpointed and resumed (MEMoE's adapter file)."""
        return self.spec.checkpointable

    def save_checkpoint(self, path: Path) -> None:
        from ... import save_adapter
        save_adapter(self.editor.model, path)

    def load_checkpoint(self, path: Path):
        """Attach a checkpointed adapter to the (unedited) model; returns ``(model, restore handle)``."""
        from ... import load_adapter, remove_memoe
        model = self.editor.model
        load_adapter(model, self.editor.tok, path)
        return model, (lambda: remove_memoe(model))

    def close(self) -> None:
        self.editor.model = None
        import gc
        gc.collect()


def load_records(easyeditor, dataset: str, path: Path) -> list[dict]:
    """Flat records through EasyEdit's own dataset classes (+ ZsRE's subject, which ZsreDataset drops)."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"data file {path} not found; pass --data-file")
    if dataset in ("zsre-knowedit", "counterfact-knowedit"):
        return _knowedit_records(easyeditor, path)
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


# KnowEdit's portability kinds, as KnowEditDataset names their fields.
PORTABILITY_FIELDS = {"Reasoning": "portability_r", "Subject_Aliasing": "portability_s",
                      "Logical_Generalization": "portability_l"}


def _knowedit_records(easyeditor, path: Path) -> list[dict]:
    """KnowEdit records through EasyEdit's KnowEditDataset, which drops two things its own KnowEdit
    runs take from the raw file: ``rephrase_prompt`` (ZsRE's) and the ground truths as plain strings.

    ``same_subject`` is the record's ``Relation_Specificity`` list as (prompt, answer) pairs: other
    facts about the edited subject; ``portability`` maps each portability kind to its pairs. KnowEdit records have no unrelated locality prompt; the
    protocol gives each one from the records it does not edit.
    """
    data = easyeditor.KnowEditDataset(str(path))
    raw = json.loads(path.read_text())
    records = []
    for i in range(len(data)):
        record = data[i]
        first = lambda value: value[0] if isinstance(value, list) and value else value   # noqa: E731
        same = [(case.get("prompt"), first(case.get("ground_truth"))) for case in record.get("locality_rs") or []]
        portability = {}
        for key, field in PORTABILITY_FIELDS.items():
            cases = [(c.get("prompt"), first(c.get("ground_truth"))) for c in record.get(field) or []]
            cases = [(p, a) for p, a in cases if p and a]
            if cases:
                portability[key] = cases
        records.append({"case_id": i, "prompt": record["prompt"], "target_new": record["target_new"],
                        "subject": record["subject"], "ground_truth": first(record["ground_truth"]),
                        "rephrase_prompt": raw[i].get("rephrase_prompt"),
                        "same_subject": [(p, a) for p, a in same if p and a], "portability": portability})
    return records


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


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
