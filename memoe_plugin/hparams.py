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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from .hparams_types import coerce as _coerce, type_name  # noqa: F401 (type_name: the reference's)

ALG_NAME = "MEMoE"
ANCHOR_BACKENDS = ("auto", "offline", "nltk")
ROUTING_INPUTS = ("anchor", "token", "sentence")
EXPERT_INITS = ("zeros",)
GATE_NORMS = ("none", "center")
SCOPE_POSITIONS = ("targets", "after_anchor")
EXPERT_ROUTINGS = ("gate", "key")
SCOPE_ANTI_KEYS = ("none", "relation_bank", "prototypes")
SCOPE_PROJECTIONS = ("leading", "random")
CHAT_MODES = ("auto", "on", "off")
CHAT_ANSWERS = ("all", "first")
EVALUATION_TYPES = ("generate-text", "LLM-judge")   # EasyEdit's real-world evaluation (None: teacher forcing)
# Neutral text put before edit prompts in training (context_prefixes); none holds an entity.
CONTEXT_PREFIXES = ("Here is a fact.", "I read that", "Let me tell you something.", "To be precise,",
                    "As everyone knows,", "Answer the question.")


def required(help: str, structural: bool = False):
    """A field every file must set; ``help`` is its line in the YAML reference."""
    return field(metadata={"help": help, "structural": structural})


def option(default, help: str, structural: bool = False):
    """A field with a default; ``help`` is its line in the YAML reference. ``structural``: the setting fixes the
    adapter's shape or routing, so it cannot change between edits of one model (``restore()`` first)."""
    return field(default=default, metadata={"help": help, "structural": structural})


@dataclass
class MEMoEHyperParams:
    """Settings of one MEMoE run. Each field's help text is its line in the README's YAML reference
    (:func:`.hparams_reference.reference_table` writes that table)."""

    # --- read by EasyEdit ---------------------------------------------------
    model_name: str = required("model directory (EasyEdit loads it; `~` is expanded)")
    layer: int = required("index of the layer whose FFN projection gets the bypass", structural=True)
    module_template: str = required(
        "dotted path with `{}` for the layer: `model.layers.{}.mlp.down_proj` (Llama, Mistral, Qwen), "
        "`transformer.h.{}.mlp.c_proj` (GPT-2, Conv1D). The module must be a `Linear` or `Conv1D`.", structural=True)
    alg_name: str = field(default=ALG_NAME, metadata={"help": "must be `MEMoE`", "required": True})
    device: Union[int, str] = option("cpu",
        "EasyEdit's device: a CUDA index or a torch device string. Without `model_parallel` it must be where "
        "the model is.")
    model_parallel: bool = option(False,
        "EasyEdit loads with `device_map=\"auto\"`; the adapter goes on its layer's device")
    max_length: int = option(40, "EasyEdit's tokenisation length for metrics")
    batch_size: int = option(1, "EasyEdit's chunk size for `batch_edit`; `edit()` needs 1")
    fp16: bool = option(False, "EasyEdit loads the model in float16; the adapter itself stays float32")
    evaluation_type: Optional[Literal["generate-text", "LLM-judge"]] = option(None,
        "EasyEdit's evaluation: unset for teacher forcing; `generate-text` or `LLM-judge` for its real-world "
        "evaluation (greedy decoding with natural stop criteria; `LLM-judge` scores by exact match without an "
        "`api_key`). Passed to EasyEdit unchanged")
    use_chat_template: bool = option(False, "EasyEdit wraps edit prompts in the tokenizer's chat template when "
                                            "scoring (passed unchanged)")
    api_key: Optional[str] = option(None, "EasyEdit's key for the `LLM-judge` evaluation (passed unchanged)")
    save_path: Optional[str] = option(None, "read by EasyEdit for some methods (passed unchanged; MEMoE saves "
                                            "with `save_adapter`)")
    quantization_bit: Optional[int] = option(None, "EasyEdit's quantised loading keys (QLoRA's), accepted so "
                                                   "that shared files validate (passed unchanged)")
    quant_type: Optional[str] = option(None, "see `quantization_bit`")
    double_quant: Optional[bool] = option(None, "see `quantization_bit`")

    # --- the mixture-of-experts bypass ------------------------------------
    num_experts: int = option(4, "number of experts", structural=True)
    top_k: int = option(1, "experts per token; the paper uses 1 (key routing needs 1)", structural=True)
    scale: float = option(1.0, "λ, the bypass scale")
    gate_noise: float = option(0.0, "std of the Gaussian noise ε on the gate logits, during training only")
    expert_init: Literal["zeros"] = option("zeros",
        "`zeros`: the untrained bypass adds exactly nothing (the tests check that logits are unchanged)")
    gate_norm: Literal["none", "center"] = option("none",
        "`none`: the gate sees R(x) = [x, anchor] as in the paper. `center`: each part is centred and scaled "
        "to unit RMS (x on the first edits' layer inputs, the anchor on the embedding table), fixed from the "
        "first edit on and saved with the adapter", structural=True)
    gate_token_weight: float = option(1.0,
        "weight of the token part x in the gate input; below 1 the anchor leads the routing "
        "(`smollm2-135m-routing.yaml` uses 0.1)", structural=True)

    # --- training ------------------------------------------------------------
    lr: float = option(2e-4, "Adam learning rate")
    lr_width: int = option(0,
        "0: `lr` as given. N > 0: `lr` is the rate for a projection of N inputs, and the experts of one with "
        "`in_features` inputs learn at `lr × N / in_features` (Adam moves each weight by about the rate, so the "
        "bypass output moves in proportion to the input width; the recipe files give lr 5e-3 at 1536, "
        "SmolLM2's `down_proj`)")
    gate_lr_scale: float = option(1.0, "the gate learns at `lr × gate_lr_scale`; 0 keeps the gate as initialised")
    steps: int = option(50, "maximum training steps per edit call (one step covers the whole batch)")
    aux_loss_weight: float = option(1e-2, "weight of the Switch load-balancing loss")
    weight_decay: float = option(0.0, "Adam weight decay")
    train_micro_batch: int = option(64,
        "edits whose graph one backward pass holds: a call's edits are trained in groups of at most this many, "
        "their gradients summed into each step (the step one batch makes, up to float rounding; the Switch "
        "balance loss is taken per group), so training memory is bounded by this setting, not by the number of "
        "edits. 0: one group per length bucket")
    early_stop: bool = option(True, "stop once every target token of the batch is predicted ...")
    early_stop_loss: float = option(0.0, "... and the target cross-entropy is at most this; 0 means accuracy alone")
    seed: int = option(42, "seeds gate initialisation and gate noise, without touching the global RNG")

    # --- knowledge anchors ------------------------------------------------
    routing_input: Literal["anchor", "sentence", "token"] = option("anchor", "`anchor`, `sentence` or `token` (see above)", structural=True)
    anchor_backend: Literal["auto", "offline", "nltk"] = option("auto", "`auto`, `offline` or `nltk`", structural=True)
    anchor_cache_size: int = option(4096, "entries in each anchor LRU cache; 0 disables caching")

    # --- extensions beyond the paper (off = paper-faithful) ------------------
    locality_guard: bool = option(False,
        "**extension.** The bypass is silent at positions whose prefix contains no knowledge anchor of an "
        "edited fact (see below)", structural=True)
    replay: int = option(0,
        "**extension.** In sequential editing, this many earlier edits (drawn reproducibly) are trained again "
        "with each new batch, against forgetting")
    context_prefixes: int = option(0,
        "**extension.** Each edit is also trained behind this many fixed, entity-free prefixes (\"Here is a "
        "fact.\", \"I read that\", ...), as ROME does with context templates, so that the expert does not learn "
        "one surface form")
    rewordings: int = option(0,
        "**extension.** Each edit is also trained, and keyed, on up to this many rewordings of its prompt that the "
        "unedited model writes itself (asked through its chat template, or continuing a few-shot prompt the project "
        "wrote), kept only where they name the subject, not the new answer, and the model expects the same "
        "continuation after them as after the prompt (see below). 0 turns it off")
    bank_rewordings: bool = option(False,
        "**extension.** An edit whose prompt names a relation of the relation bank by one of its labels is also "
        "trained, and keyed, with that label replaced by each of the relation's other labels (\"The birthplace of S "
        "is\" beside \"The place of birth of S is\"; see below)")
    aliases: int = option(0,
        "**extension**, with `locality_guard`: the guard also opens, for each edit, on up to this many other names "
        "for its subject that the unedited model gives when asked once, kept only where the model answers the edit "
        "prompt with the name in place of the subject as it answers the prompt (see below). 0 turns it off")
    ask_samples: int = option(8, "candidates sampled per edit when the model is asked for `rewordings` or `aliases`")
    memory_rows: int = option(0,
        "**extension.** Output memory against forgetting in sequential editing: the layer inputs of this many "
        "edited positions (reservoir-sampled, float16) are kept with the bypass output they were trained to, "
        "and later edits are penalised for moving those outputs. 0 turns it off", structural=True)
    memory_weight: float = option(1.0,
        "weight of the output-memory penalty (relative squared change of the stored outputs)")
    memory_batch: int = option(1024, "stored rows drawn per training step for the penalty")
    scope_keys: bool = option(False,
        "**extension.** Key scope: the bypass acts only where its layer input is close (cosine >= "
        "`scope_threshold`, after centring) to the input at a position that predicts an edited target. Keeps "
        "other questions about an edited subject out of the edit (see below)", structural=True)
    scope_threshold: float = option(0.5, "cosine similarity a position needs to a key to be in scope")
    scope_snap: float = option(0.0,
        "**extension**, with `scope_keys`: an in-scope position's expert reads its layer input moved this share "
        "of the way to the input of the key it matched (0: its own input, as the paper; 1: the edit's own), so "
        "a rewording gets the correction the edit was trained to. Keeps each key's input (2 bytes per feature)")
    scope_values: bool = option(False,
        "**extension**, with `scope_keys`, `scope_snap: 1` and `expert_routing: key`: at the end of each edit call "
        "every key of the call keeps its bypass output (`W_e x_key`, what the expert gives any position that "
        "matches the key) as one row of the projection's output width, and the experts are emptied. Later calls "
        "never change an earlier edit, one edit can be taken back alone (`remove_edits`), and nothing kept per "
        "edit grows with the projection's in × out (see below)", structural=True)
    close_every: int = option(0,
        "with `scope_values`: a call's edits are trained and closed in groups of at most this many, in order, as "
        "sequential calls of that size would be (each group's keys keep their values before the next group "
        "trains). A call of any size then trains as fast per edit as a call of this size, and holds the memory of "
        "one group; if a group fails, the groups before it are taken back too. 0: the whole call at once")
    scope_layer: int = option(-1,
        "what the key scope compares: -1, the bypass input (the projection's input at `layer`); an index "
        "<= `layer`, the residual stream entering that block, where relation words may still stand apart", structural=True)
    scope_rank: int = option(0,
        "with `scope_keys`: compare on this many leading directions of the first call's inputs (0: all); it also "
        "bounds the bytes each key and anti-key keeps (2 per direction)", structural=True)
    scope_projection: Literal["leading", "random"] = option("leading",
        "with `scope_rank` > 0: the directions compared on: `leading`, the first call's leading directions; "
        "`random`, a random orthonormal subspace fixed by `seed` before any edit (cosines kept to about "
        "1/sqrt(`scope_rank`) whatever the inputs), which bounds the bytes of each key at wide projections "
        "(Llama-3-8B's `down_proj` reads 14,336 features)", structural=True)
    scope_storage: Literal["float16", "int8"] = option("float16",
        "with `scope_keys`: how keys, anti-keys and key inputs are kept: `float16` (2 bytes per feature) or `int8` "
        "(1 byte per feature and a float32 scale per row, symmetric per-row quantisation; see docs/results.md for "
        "what it costs)", structural=True)
    scope_anti_keys: Literal["none", "relation_bank", "prototypes"] = option("none",
        "**extension**, with `scope_keys`: anti-keys, what other questions about an edit's subject look like at "
        "the layer; a position nearer one of its matched edit's anti-keys than that edit's key is out of scope "
        "(see below). `prototypes`: built from one vector per edit (its subject, from `scope_anti_probes` short "
        "prompts) and the relation prototypes the model's layer gives the bank's relations on generic subjects, "
        "computed once per model and layer and cached; `relation_bank`: the inputs of prompts about the edit's "
        "subject for every relation of the bank (`routing.relations`), kept per edit; `none`: off",
        structural=True)
    scope_anti_relations: int = option(64,
        "how many relations of the bank (the ones most subjects have come first) the anti-keys ask about; with "
        "`relation_bank` each costs up to two short forward passes per edit", structural=True)
    scope_anti_probes: int = option(4,
        "with `scope_anti_keys: prototypes`: the short prompts per edit (\"The {relation} of {subject} is\" for the "
        "bank's first relations the edit does not ask) whose inputs, less their relations' prototypes, give the "
        "edit's subject vector")
    scope_anti_margin: float = option(0.0,
        "how much nearer an anti-key than the key a position must be to be put out of scope")
    scope_copy_similarity: float = option(0.97,
        "an anti-key worded as the edit itself (`same_frame`) counts only where a position is at least this "
        "similar to it: a near-copy of another fact's question, not a rewording of the edit")
    scope_stop_keys: bool = option(False,
        "**extension**, with `scope_keys`: each edit also keeps the layer input at its answer's last token as an "
        "anti-key, so that the position after the answer (which resembles its keys, and would repeat the "
        "answer's last token through the snap) goes back to the base model: the answer ends where it should",
        structural=True)
    scope_positions: Literal["targets", "after_anchor"] = option("targets",
        "which positions of an edit become keys: `targets` (those that predict a target token) or `after_anchor` "
        "(every position after the anchor's last token up to those, which needs `locality_guard`)")
    expert_routing: Literal["gate", "key"] = option("gate",
        "`gate`: the paper's gate top_k(softmax(W_g R(x))) picks the experts. `key` (**extension**, needs "
        "`scope_keys`): each position goes to the expert of the edit whose key it matches, and each edit has "
        "its expert (see `edits_per_expert`)", structural=True)
    edits_per_expert: int = option(0,
        "with `expert_routing: key`: N > 0 gives edit i expert i // N, growing the mixture as edits come and "
        "training only the newest experts (earlier ones never change); 0 spreads the edits round the "
        "`num_experts` experts", structural=True)
    preserve_prompts: int = option(0,
        "**extension.** Preservation prompts per edit: prompts about the edited subject with other relations "
        "(the call's other edits' templates and a fixed list), whose next-token distributions are kept by a KL "
        "term (see below). 0 turns it off")
    preserve_weight: float = option(1.0, "weight of the preservation KL term")
    chat: Literal["auto", "on", "off"] = option("off",
        "**extension.** Edits that hold when the model is asked through its chat template. `auto` (when the "
        "tokenizer has a chat template) or `on`: each edit is also trained as EasyEdit scores it with "
        "`use_chat_template` (its user turn and the generation prompt, then the target), the template's own "
        "tokens never count as anchors, and the key scope decides a template token on the conversation's last "
        "token before it (see below). `off`: raw prompts only", structural=True)
    chat_answer: Literal["all", "first"] = option("all",
        "**extension**, with `chat`. How much of the chat reply trains in the chat context. `all`: the whole reply, "
        "trained and keyed as EasyEdit scores it. `first`: only the reply's first token (the decision the generation "
        "prompt takes); a token the assistant writes may then match the raw prompt's answer keys, so the reply's "
        "later tokens get the raw answer's trained outputs without a training row or a key of their own (a reply "
        "whose answer tokens differ from the raw answer's trains whole). About 2x the raw edit time instead of "
        "2.5-2.8x and half the chat keys, but fewer replies hold the edit (docs/results.md \"Chat training's price\"). "
        "`first` needs `scope_keys` with `scope_snap: 1`", structural=True)

    @property
    def chat_first_token(self) -> bool:
        """``chat_answer: first``: does the chat copy of an edit train only the reply's first token?"""
        return self.chat_answer == "first"

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
        config = flatten_sections(config)
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
        need(self.lr_width >= 0, "lr_width", "an integer >= 0 (0: lr as given)")
        need(self.steps >= 1, "steps", "an integer >= 1")
        need(self.aux_loss_weight >= 0, "aux_loss_weight", "a number >= 0")
        need(self.early_stop_loss >= 0, "early_stop_loss", "a number >= 0")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.train_micro_batch >= 0, "train_micro_batch", "an integer >= 0 (0: no bound)")
        need(self.max_length >= 1, "max_length", "an integer >= 1")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.routing_input in ROUTING_INPUTS, "routing_input", f"one of {ROUTING_INPUTS}")
        need(self.anchor_backend in ANCHOR_BACKENDS, "anchor_backend", f"one of {ANCHOR_BACKENDS}")
        need(self.anchor_cache_size >= 0, "anchor_cache_size", "an integer >= 0")
        need(self.replay >= 0, "replay", "an integer >= 0")
        need(self.rewordings >= 0, "rewordings", "an integer >= 0 (0: off)")
        need(self.aliases >= 0, "aliases", "an integer >= 0 (0: off)")
        need(self.aliases == 0 or self.locality_guard, "aliases",
             "0 unless locality_guard is true: the names the model gives are anchors of the guard")
        need(self.ask_samples >= 1, "ask_samples", "an integer >= 1")
        need(self.memory_rows >= 0, "memory_rows", "an integer >= 0 (0: no output memory)")
        need(self.memory_weight >= 0, "memory_weight", "a number >= 0")
        need(self.memory_batch >= 1, "memory_batch", "an integer >= 1")
        need(-1.0 <= self.scope_threshold <= 1.0, "scope_threshold", "a cosine similarity in [-1, 1]")
        need(0.0 <= self.scope_snap <= 1.0, "scope_snap", "a share in [0, 1]")
        need(self.scope_snap == 0 or self.scope_keys, "scope_snap", "0 unless scope_keys is true")
        need(self.scope_positions in SCOPE_POSITIONS, "scope_positions", f"one of {SCOPE_POSITIONS}")
        need(-1 <= self.scope_layer <= self.layer, "scope_layer",
             f"-1 (the bypass input) or a block index in 0..layer ({self.layer}): the scope must be read before "
             "the bypass acts")
        need(self.scope_rank >= 0, "scope_rank", "an integer >= 0 (0: every direction)")
        need(self.scope_projection in SCOPE_PROJECTIONS, "scope_projection", f"one of {SCOPE_PROJECTIONS}")
        need(self.scope_anti_keys in SCOPE_ANTI_KEYS, "scope_anti_keys", f"one of {SCOPE_ANTI_KEYS}")
        need(self.scope_anti_keys == "none" or self.scope_keys, "scope_anti_keys",
             "'none' unless scope_keys is true: anti-keys are compared with the key scope's keys")
        need(self.scope_anti_relations >= 1, "scope_anti_relations", "an integer >= 1")
        need(not self.scope_stop_keys or self.scope_keys, "scope_stop_keys",
             "false unless scope_keys is true: stop keys are anti-keys of the key scope")
        need(self.scope_anti_probes >= 1, "scope_anti_probes", "an integer >= 1")
        need(self.chat in CHAT_MODES, "chat", f"one of {CHAT_MODES}")
        need(self.chat_answer in CHAT_ANSWERS, "chat_answer", f"one of {CHAT_ANSWERS}")
        need(self.chat_answer != "first" or (self.scope_keys and self.scope_snap == 1.0),
             "chat_answer", "'all' unless scope_keys is true with scope_snap 1: with 'first' the reply's later tokens "
             "are read through the raw answer's keys")
        need(self.chat != "off" or not self.use_chat_template, "chat",
             "'auto' or 'on' with use_chat_template: true (EasyEdit then asks every edit through the chat "
             "template, so MEMoE must train it there)")
        need(-1.0 <= self.scope_anti_margin <= 2.0, "scope_anti_margin", "a number in [-1, 2]")
        need(-1.0 <= self.scope_copy_similarity <= 1.0, "scope_copy_similarity", "a cosine similarity in [-1, 1]")
        need(self.expert_routing in EXPERT_ROUTINGS, "expert_routing", f"one of {EXPERT_ROUTINGS}")
        need(self.expert_routing != "key" or self.scope_keys, "expert_routing",
             "'gate' unless scope_keys is true: key routing needs the key scope's keys")
        need(self.expert_routing != "key" or self.top_k == 1, "top_k",
             "1 with expert_routing: key (each position goes to the one expert of the edit it matches)")
        need(self.edits_per_expert >= 0, "edits_per_expert", "an integer >= 0")
        if self.scope_values:
            need(self.scope_keys and self.scope_snap == 1.0 and self.expert_routing == "key", "scope_values",
                 "false unless scope_keys is true, scope_snap is 1 and expert_routing is 'key': only then is the "
                 "bypass output at a matched key one fixed row")
            need(self.edits_per_expert == 0, "edits_per_expert",
                 "0 with scope_values (each call's experts are emptied once its keys keep their values; there is no "
                 "expert to grow)")
            need(self.memory_rows == 0, "memory_rows",
                 "0 with scope_values (no expert outlives its call, so there is nothing for an output memory to "
                 "protect; earlier edits' values never change)")
            need(self.replay == 0, "replay", "0 with scope_values (earlier edits keep their values unchanged; there "
                 "is nothing to replay)")
        need(self.close_every >= 0, "close_every", "an integer >= 0 (0: the whole call at once)")
        need(self.close_every == 0 or self.scope_values, "close_every",
             "0 unless scope_values is true: only closed keys keep a group's edits while the next one trains")
        need(self.preserve_prompts >= 0, "preserve_prompts", "an integer >= 0 (0: off)")
        need(self.scope_positions == "targets" or (self.scope_keys and self.locality_guard), "scope_positions",
             "'targets' unless scope_keys and locality_guard are on: 'after_anchor' keys the positions after the "
             "anchor the guard finds")
        need(self.edits_per_expert == 0 or self.expert_routing == "key", "edits_per_expert",
             "0 unless expert_routing is 'key': it assigns each edit's expert by its key")
        need(self.preserve_weight >= 0, "preserve_weight", "a number >= 0")
        need(0 <= self.context_prefixes <= len(CONTEXT_PREFIXES), "context_prefixes",
             f"an integer in 0..{len(CONTEXT_PREFIXES)}")
        need(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        need(self.evaluation_type is None or self.evaluation_type in EVALUATION_TYPES, "evaluation_type",
             f"unset (teacher forcing) or one of {EVALUATION_TYPES}")
        if isinstance(self.device, int):
            need(self.device >= 0, "device", "a CUDA index >= 0 or a device string such as 'cpu'")

    @property
    def module_name(self) -> str:
        """The dotted name of the wrapped module, e.g. ``model.layers.16.mlp.down_proj``."""
        return self.module_template.format(self.layer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Each extension's settings may be written as a section: ``scope: {keys: true, threshold: 0.4}`` is
# ``scope_keys: true`` and ``scope_threshold: 0.4`` (and ``scope.threshold=0.4`` on a command line).
SECTIONS = {"scope": "scope_", "memory": "memory_", "preserve": "preserve_"}


def section_fields(section: str) -> list[str]:
    prefix = SECTIONS[section]
    return [f.name[len(prefix):] for f in dataclasses.fields(MEMoEHyperParams) if f.name.startswith(prefix)]


def flatten_sections(config: dict) -> dict:
    """``config`` with its sections (a mapping under a section name, or ``section.key`` keys) as flat keys."""
    flat = {}
    for key, value in config.items():
        section, dot, sub = str(key).partition(".")
        if section in SECTIONS and (dot or isinstance(value, dict)):
            items = {sub: value} if dot else value
            for name, item in items.items():
                if name not in section_fields(section):
                    raise ValueError(f"{section}.{name} is not a setting of the {section!r} section; its settings are "
                                     f"{section_fields(section)}")
                target = SECTIONS[section] + name
                if target in flat or target in config:
                    raise ValueError(f"{section}.{name} is given twice (also as {target}); keep one")
                flat[target] = item
        elif key in flat:
            raise ValueError(f"{key} is given twice (also inside its section); keep one")
        else:
            flat[key] = value
    return flat


def structural_keys() -> tuple[str, ...]:
    """The settings that fix an adapter's shape or routing (``structural`` in their field's metadata)."""
    return tuple(f.name for f in dataclasses.fields(MEMoEHyperParams) if f.metadata.get("structural"))
