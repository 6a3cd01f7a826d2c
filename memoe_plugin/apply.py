"""``apply_memoe_to_model``: EasyEdit's apply-function contract for MEMoE.

The first call injects the bypass; later calls on the same model reuse it, so
sequential editing accumulates knowledge in the same experts. The returned
``restore`` callable removes the adapter, leaving the model bit-identical to its
state before the first edit.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import random
from typing import Callable

import torch
from torch import nn

from .hparams import CONTEXT_PREFIXES, MEMoEHyperParams, structural_keys
from .routing.relations import same_relation_rewordings
from .adapter import MEMoEAdapter, get_adapter
from .locate import resolve_module
from .training.batches import ANSWER_TOKENS, repeats_answer
from .training.trainer import train_experts

# Settings that fix the adapter's shape: they must not change between sequential edits (the fields marked
# structural in hparams.py). Every other setting a later call gives is used from that call on.
STRUCTURAL_KEYS = structural_keys()


def apply_memoe_to_model(model: nn.Module, tok, requests: list[dict], hparams: MEMoEHyperParams,
                         copy: bool = False, return_orig_weights: bool = False,
                         keep_original_weight: bool = False, **kwargs) -> tuple[nn.Module, Callable[[], None]]:
    """Edit ``model`` with MEMoE; return ``(model, restore)``.

    ``return_orig_weights`` and ``keep_original_weight`` are accepted for EasyEdit's
    contract; MEMoE never writes the base weights, so ``restore`` is always exact.
    ``copy=True`` edits a deep copy and leaves ``model`` untouched.
    """
    if not isinstance(hparams, MEMoEHyperParams):
        raise TypeError(f"hparams must be MEMoEHyperParams, got {type(hparams).__name__}")
    hparams.validate()
    if not callable(tok) or not hasattr(tok, "decode"):
        raise TypeError(f"tok must be the model's tokenizer (a transformers tokenizer), got {type(tok).__name__}")
    requests = check_requests(requests)
    check_lengths(tok, requests, model)
    if copy:
        model = copy_module.deepcopy(model)
    if hparams.close_every and len(requests) > hparams.close_every:
        return _in_groups(model, tok, requests, hparams, **kwargs)
    adapter = get_adapter(model)
    fresh = adapter is None
    if fresh:
        _, _, module = resolve_module(model, hparams)
        check_device(module, hparams)
        adapter = MEMoEAdapter.attach(model, tok, hparams)
    else:
        check_same_structure(adapter.hparams, hparams)
        adapter.configure(hparams)
    guard_state = adapter.guard.state() if adapter.guard is not None else None
    first, experts_before = len(adapter.edits), adapter.bypass.experts.shape[0]
    tagged = [dict(r, _edit=first + i) for i, r in enumerate(requests)]   # the edits' ids, for the key scope
    try:
        adapter.assign_experts(first, len(requests))
        adapter.register_knowledge(requests, first)
        aliases = register_aliases(adapter, tagged)
        batch = training_variants(tagged + replayed_edits(adapter.edits, hparams), hparams, adapter.template)
        rewordings = reworded(adapter, tagged)
        batch += rewordings
        check_lengths(tok, batch[len(tagged):], model)
        report = train_experts(adapter, batch, progress=bool(kwargs.get("progress", False)), subjects_of=tagged)
        adapter.last_report = dataclasses.replace(report, rewordings=len(rewordings), aliases=aliases)
    except BaseException:
        if fresh:
            adapter.detach()
        else:
            if guard_state is not None:
                adapter.guard.restore(guard_state)
            adapter.bypass.resize_experts(experts_before)
            if adapter.bypass.router is not None:
                adapter.bypass.router.truncate(first)
        raise
    adapter.edits.extend({key: r[key] for key in ("prompt", "target_new", "subject") if key in r}
                         for r in requests)
    return model, lambda: remove_memoe(model)


def _in_groups(model: nn.Module, tok, requests: list[dict], hparams: MEMoEHyperParams,
               **kwargs) -> tuple[nn.Module, Callable[[], None]]:
    """``close_every``: the call's edits trained and closed group after group, as sequential calls; a group that fails
    takes the call's earlier groups back with it (exactly: closed edits come out alone, ``remove_edits``)."""
    from .persist.edits import remove_edits
    size, existed = hparams.close_every, get_adapter(model) is not None
    first = len(get_adapter(model).edits) if existed else 0
    try:
        for lo in range(0, len(requests), size):
            apply_memoe_to_model(model, tok, requests[lo:lo + size], hparams, **kwargs)
    except BaseException:
        adapter = get_adapter(model)
        if adapter is not None and not existed:
            adapter.detach()
        elif adapter is not None and len(adapter.edits) > first:
            remove_edits(model, range(first, len(adapter.edits)))
        raise
    return model, lambda: remove_memoe(model)


def training_variants(requests: list[dict], hparams: MEMoEHyperParams, template=None) -> list[dict]:
    """What training sees of the requests: each as it is, behind the first ``context_prefixes`` neutral prefixes, with
    the relation bank's other labels for the relation its prompt names (``bank_rewordings``), and
    (``template``: the tokenizer's :class:`~.routing.template.ChatTemplate`, ``chat``) asked through the chat template
    as EasyEdit's ``use_chat_template`` scores it, the answer then closing the assistant's turn. Every copy keeps its
    request's edit id and subject."""
    prefixes = CONTEXT_PREFIXES[:hparams.context_prefixes]
    out = requests + [dict(r, prompt=f"{prefix} {r['prompt']}") for prefix in prefixes for r in requests]
    if hparams.bank_rewordings:
        out += [dict(r, prompt=text) for r in requests
                for text in same_relation_rewordings(r["prompt"], r.get("subject"))]
    if template is not None:
        for r in requests:
            wrapped = dict(r, prompt=template.wrap(r["prompt"]), target_new=template.answer(r["target_new"]))
            # chat_answer first: the reply's first token, where the reply repeats the raw answer's tokens
            if hparams.chat_first_token and repeats_answer(template.tokenizer, r, wrapped):
                wrapped[ANSWER_TOKENS] = 1
            out.append(wrapped)
    return out


def register_aliases(adapter, requests: list[dict]) -> int:
    """``aliases``: the other names the unedited model gives for each request's subject open the locality guard for
    its edit (``training.aliases``); returns how many were added."""
    hp = adapter.hparams
    if not hp.aliases or adapter.guard is None:
        return 0
    from .training.aliases import model_aliases
    from .training.capture import unedited
    with unedited(adapter):
        names = model_aliases(adapter.model, adapter.tokenizer, requests, hp.aliases, hp.ask_samples, hp.seed,
                              bool(getattr(adapter.tokenizer, "chat_template", None)))
    for request, found in zip(requests, names):
        if found:
            adapter.guard.add(found, request["_edit"])
    return sum(map(len, names))


def reworded(adapter, requests: list[dict]) -> list[dict]:
    """``rewordings``: each request again with each rewording of its prompt that the unedited model writes
    (``training.rewordings``), keeping its edit id, subject and answer."""
    hp = adapter.hparams
    if not hp.rewordings:
        return []
    from .training.capture import unedited
    from .training.rewordings import model_rewordings
    chat = bool(getattr(adapter.tokenizer, "chat_template", None))
    with unedited(adapter):
        found = model_rewordings(adapter.model, adapter.tokenizer, requests, hp.rewordings, hp.ask_samples,
                                 hp.seed, chat)
    return [dict(r, prompt=text) for r, texts in zip(requests, found) for text in texts]


def replayed_edits(previous: list[dict], hparams: MEMoEHyperParams) -> list[dict]:
    """Up to ``hparams.replay`` earlier edits, drawn reproducibly, trained again with the new ones."""
    if not hparams.replay or not previous:
        return []
    rng = random.Random(hparams.seed + len(previous))
    chosen = rng.sample(range(len(previous)), min(hparams.replay, len(previous)))
    return [dict(previous[i], _edit=i) for i in chosen]


def remove_memoe(model: nn.Module) -> None:
    """Take the MEMoE adapter out of ``model`` (no-op when there is none)."""
    adapter = get_adapter(model)
    if adapter is not None:
        adapter.detach()


def check_requests(requests) -> list[dict]:
    """EasyEdit request dicts with a non-empty string prompt and target_new."""
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        raise ValueError(f"requests must be a list of dicts with 'prompt' and 'target_new' (or one such dict), "
                         f"got {type(requests).__name__}; pass list(...) for other iterables")
    if len(requests) == 0:
        raise ValueError("MEMoE got no edit requests: pass a non-empty list of dicts with "
                         "'prompt' and 'target_new'.")
    for i, request in enumerate(requests):
        if not isinstance(request, dict):
            raise ValueError(f"request {i} is a {type(request).__name__}, expected a dict with "
                             "'prompt' and 'target_new'")
        for key in ("prompt", "target_new"):
            value = request.get(key)
            if not isinstance(value, str):
                raise ValueError(f"request {i}: {key!r} must be a string, got {type(value).__name__} "
                                 f"({value!r})")
            if not value.strip():
                raise ValueError(f"request {i}: {key!r} is empty or whitespace; give the text to edit")
    return list(requests)


def check_lengths(tok, requests: list[dict], model: nn.Module) -> None:
    """prompt + ' ' + target_new must fit in the model's positions (config.max_position_embeddings)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for i, request in enumerate(requests):
        length = len(tok(request["prompt"] + " " + request["target_new"])["input_ids"])
        if length > limit:
            raise ValueError(f"request {i}: prompt + target_new is {length} tokens, more than the model's {limit} "
                             "positions (max_position_embeddings); shorten the prompt")


def check_device(module: nn.Module, hparams: MEMoEHyperParams) -> None:
    """hparams.device must exist and, without model_parallel, hold the wrapped module."""
    wanted = torch.device(f"cuda:{hparams.device}") if isinstance(hparams.device, int) else None
    try:
        wanted = wanted or torch.device(str(hparams.device))
    except RuntimeError:
        raise ValueError(f"device = {hparams.device!r} is not a torch device; use 'cpu', 'cuda', "
                         "'cuda:0' or a CUDA index") from None
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {hparams.device!r} but CUDA is not available here; set device: cpu")
    actual = module.weight.device
    if actual.type == "meta" and wanted.type != "meta":
        raise ValueError(f"{hparams.module_name} has its weights on the meta device (offloaded by device_map to "
                         "disk or CPU, or not loaded); MEMoE needs the wrapped layer in memory. Load the model with "
                         "a device_map that keeps this layer on a GPU or on 'cpu'.")
    if hparams.model_parallel:
        return
    if actual.type != wanted.type or (wanted.index is not None and actual.index != wanted.index):
        raise ValueError(f"the edited module is on {actual} but hparams.device is {hparams.device!r}; move the model "
                         f"(model.to({str(wanted)!r})) or set device in the hparams file")


def check_same_structure(old: MEMoEHyperParams, new: MEMoEHyperParams) -> None:
    changed = [k for k in STRUCTURAL_KEYS if getattr(old, k) != getattr(new, k)]
    if changed:
        raise ValueError(f"the model's MEMoE adapter was built with other {changed}; restore() it first "
                         "or keep those settings for sequential edits")

