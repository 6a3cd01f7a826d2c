"""MEMoE hyperparameters: one validated dataclass, read from YAML.

The field names that EasyEdit's ``BaseEditor`` and metric code read
(``alg_name``, ``model_name``, ``device``, ``model_parallel``, ``max_length``,
``batch_size``, ``fp16``) keep EasyEdit's meaning; the rest belong to the method.
Every problem found while reading a file raises ``ValueError`` naming the key,
what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

ALG_NAME = "MEMoE"
ANCHOR_BACKENDS = ("auto", "offline", "nltk")
ROUTING_INPUTS = ("anchor", "token", "sentence")
EXPERT_INITS = ("zeros",)
GATE_NORMS = ("none", "center")
# Neutral text put before edit prompts in training (context_prefixes); none holds an entity.
CONTEXT_PREFIXES = ("Here is a fact.", "I read that", "Let me tell you something.", "To be precise,",
                    "As everyone knows,", "Answer the question.")


@dataclass
class MEMoEHyperParams:
    """Settings of one MEMoE run. See the README's YAML reference for each field."""

    # --- read by EasyEdit ---------------------------------------------------
    model_name: str
    layer: int
    module_template: str
    alg_name: str = ALG_NAME
    device: Union[int, str] = "cpu"
    model_parallel: bool = False
    max_length: int = 40
    batch_size: int = 1
    fp16: bool = False

    # --- the mixture-of-experts bypass ------------------------------------
    num_experts: int = 4
    top_k: int = 1
    scale: float = 1.0          # lambda in h = W0 x + lambda * sum_e G_e W_e x
    gate_noise: float = 0.0     # std of the Gaussian noise on gate logits, training only
    expert_init: str = "zeros"  # zeros: the untrained adapter changes nothing
    gate_norm: str = "none"     # none: W_g R(x) as in the paper | center: W_g((R(x) - mean) / rms), per part
    gate_token_weight: float = 1.0  # weight of the token part x of R(x) = [x, anchor] in the gate

    # --- training ------------------------------------------------------------
    lr: float = 2e-4
    gate_lr_scale: float = 1.0      # the gate learns at lr * gate_lr_scale (0: the gate stays as initialised)
    steps: int = 50
    aux_loss_weight: float = 1e-2   # Switch-Transformer load-balancing loss
    weight_decay: float = 0.0
    early_stop: bool = True          # stop once every target token is predicted ...
    early_stop_loss: float = 0.0     # ... and the target cross-entropy is at most this (0: accuracy only)
    seed: int = 42

    # --- knowledge anchors ------------------------------------------------
    routing_input: str = "anchor"   # anchor | token | sentence (paper Table 5)
    anchor_backend: str = "auto"    # auto | offline | nltk
    anchor_cache_size: int = 4096

    # --- extensions beyond the paper (off = paper-faithful) ------------------
    locality_guard: bool = False     # bypass silent unless an edited fact's anchor is in the prefix
    replay: int = 0                  # earlier edits mixed into each later sequential edit
    context_prefixes: int = 0        # also train each edit behind this many neutral prefixes (ROME-style)
    memory_rows: int = 0             # output memory against forgetting: rows kept (0: off); memory.py
    memory_weight: float = 1.0       # weight of the output-memory penalty
    memory_batch: int = 1024         # stored rows drawn per training step

    # ------------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, os.PathLike]) -> "MEMoEHyperParams":
        """Read a YAML file (the ``.yaml`` suffix may be left out) and validate it."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise FileNotFoundError(f"MEMoE hparams file not found: {path}")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err}). Fix the syntax of the file.") from err
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a YAML mapping of hparam names to values, "
                             f"got {type(config).__name__}.")
        try:
            return cls.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, config: dict) -> "MEMoEHyperParams":
        config = dict(config)
        if "alg_name" not in config:
            raise ValueError(f"missing key 'alg_name': expected alg_name: {ALG_NAME}")
        if config["alg_name"] != ALG_NAME:
            raise ValueError(f"alg_name is {config['alg_name']!r}; this class reads only "
                             f"alg_name: {ALG_NAME}. Load other methods' files with their own class.")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; valid keys are {sorted(known)}")
        missing = [name for name, f in known.items()
                   if name not in config and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"missing required key(s) {missing}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(name, value, hints[name]) for name, value in config.items()}
        if isinstance(values.get("model_name"), str) and values["model_name"].startswith("~"):
            values["model_name"] = os.path.expanduser(values["model_name"])
        hparams = cls(**values)
        hparams.validate()
        return hparams

    def validate(self) -> None:
        """Range and choice checks that do not need the model."""
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{key} = {getattr(self, key)!r}: expected {expected}")

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):   # fields set after construction are checked too
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))

        need(self.alg_name == ALG_NAME, "alg_name", repr(ALG_NAME))
        need(bool(self.model_name.strip()), "model_name", "a model directory or name")
        need(self.layer >= 0, "layer", "a layer index >= 0")
        need("{}" in self.module_template, "module_template",
             "a dotted module path with '{}' where the layer index goes, "
             "e.g. model.layers.{}.mlp.down_proj or transformer.h.{}.mlp.c_proj")
        need(self.num_experts >= 1, "num_experts", "an integer >= 1")
        need(1 <= self.top_k <= self.num_experts, "top_k", f"1 <= top_k <= num_experts ({self.num_experts})")
        need(self.scale > 0, "scale", "a number > 0")
        need(self.gate_noise >= 0, "gate_noise", "a number >= 0")
        need(self.expert_init in EXPERT_INITS, "expert_init", f"one of {EXPERT_INITS}")
        need(self.gate_token_weight >= 0, "gate_token_weight", "a number >= 0")
        need(self.gate_norm in GATE_NORMS, "gate_norm", f"one of {GATE_NORMS}")
        need(self.lr > 0, "lr", "a learning rate > 0")
        need(self.gate_lr_scale >= 0, "gate_lr_scale", "a number >= 0")
        need(self.steps >= 1, "steps", "an integer >= 1")
        need(self.aux_loss_weight >= 0, "aux_loss_weight", "a number >= 0")
        need(self.early_stop_loss >= 0, "early_stop_loss", "a number >= 0")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.max_length >= 1, "max_length", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.routing_input in ROUTING_INPUTS, "routing_input", f"one of {ROUTING_INPUTS}")
        need(self.anchor_backend in ANCHOR_BACKENDS, "anchor_backend", f"one of {ANCHOR_BACKENDS}")
        need(self.anchor_cache_size >= 0, "anchor_cache_size", "an integer >= 0")
        need(self.replay >= 0, "replay", "an integer >= 0")
        need(self.memory_rows >= 0, "memory_rows", "an integer >= 0 (0: no output memory)")
        need(self.memory_weight >= 0, "memory_weight", "a number >= 0")
        need(self.memory_batch >= 1, "memory_batch", "an integer >= 1")
        need(0 <= self.context_prefixes <= len(CONTEXT_PREFIXES), "context_prefixes",
             f"an integer in 0..{len(CONTEXT_PREFIXES)}")
        need(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        if isinstance(self.device, int):
            need(self.device >= 0, "device", "a CUDA index >= 0 or a device string such as 'cpu'")

    @property
    def module_name(self) -> str:
        """The dotted name of the wrapped module, e.g. ``model.layers.16.mlp.down_proj``."""
        return self.module_template.format(self.layer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one YAML value against its field type; accept '1e-4'-style strings for floats."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{key} = {value!r} ({type(value).__name__}): expected {names}")
