"""The chat template's own tokens (routing/template.py) and edits asked through a template, on tiny models."""
from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, EDITS, LLAMA_TEMPLATE, make_hparams, rewrite

from memoe_plugin import apply_memoe_to_model, get_adapter, remove_memoe
from memoe_plugin.apply import training_variants
from memoe_plugin.assets.tiny import tiny_llama, train_chat_tokenizer
from memoe_plugin.persist import load_adapter, save_adapter
from memoe_plugin.routing.template import IN_CHAT, PLAIN, TEMPLATE, USER, ChatTemplate
from memoe_plugin.training.batches import ANSWER_TOKENS, build_edit_batches, repeats_answer


@pytest.fixture(scope="module")
def chat_tokenizer():
    return train_chat_tokenizer(CORPUS)


def chat_hparams(**overrides):
    values = dict(locality_guard=True, scope_keys=True, scope_threshold=0.4, scope_snap=1.0, expert_routing="key",
                  chat="auto", steps=150, early_stop=True, lr=5e-2)
    values.update(overrides)
    return make_hparams(LLAMA_TEMPLATE, **values)


def test_the_fragments_are_found_and_each_position_gets_its_kind(chat_tokenizer):
    template = ChatTemplate(chat_tokenizer)
    text = template.wrap("The capital of Japan is") + " Warsaw"
    ids = chat_tokenizer(text)["input_ids"]
    kinds = template.kinds(ids)
    question = chat_tokenizer("The capital of Japan is", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
    end = start + len(question)
    answer = len(ids) - len(chat_tokenizer(" Warsaw", add_special_tokens=False)["input_ids"])
    assert set(kinds[:start]) == {TEMPLATE}                        # the system turn and the user header
    assert set(kinds[start:end]) == {USER}                         # what the user wrote
    assert set(kinds[end:answer]) == {TEMPLATE}                    # end of turn and the generation prompt
    assert set(kinds[answer:]) == {IN_CHAT}                        # what the assistant says
    own, reads = template.split(ids)
    assert reads[answer - 1] == end - 1 - sum(1 for k in kinds[:end] if k == TEMPLATE)   # the question's last token
    assert all(r == -1 for r in reads[end:answer - 1])             # the rest of the fragment reads nothing
    assert all(r == -1 for r in reads[:start])
    assert template.kinds(chat_tokenizer("The capital of Japan is Warsaw")["input_ids"]) == [PLAIN] * len(
        chat_tokenizer("The capital of Japan is Warsaw")["input_ids"])
    assert template.turn_end == "<|im_end|>"


def test_a_tokenizer_without_a_template_is_refused_or_left_alone(tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplate(tokenizer)
    assert ChatTemplate.of(tokenizer) is None
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="chat: on, but this tokenizer has no chat template"):
        apply_memoe_to_model(model, tokenizer, EDITS[:1], chat_hparams(chat="on"))
    assert get_adapter(model) is None
    _, restore = apply_memoe_to_model(model, tokenizer, EDITS[:1], chat_hparams(chat="auto", steps=2))
    assert get_adapter(model).template is None      # auto: raw prompts only
    restore()


def test_use_chat_template_needs_chat_training():
    with pytest.raises(ValueError, match="chat.*use_chat_template"):
        make_hparams(use_chat_template=True, chat="off")
    assert make_hparams(use_chat_template=True, chat="auto").use_chat_template


def test_the_templates_own_tokens_never_count_as_an_anchor(chat_tokenizer):
    """An edit about "Hugging Face", named in the template's default system turn: a chat about something else
    never wakes the guard, and the anchors of a chat are the conversation's own entities."""
    model = tiny_llama(len(chat_tokenizer))
    edit = {"prompt": "The founder of Hugging Face is", "target_new": "Warsaw", "subject": "Hugging Face"}
    _, restore = apply_memoe_to_model(model, chat_tokenizer, [edit], chat_hparams(steps=5))
    adapter = get_adapter(model)
    template = adapter.template
    unrelated = chat_tokenizer(template.wrap("The capital of Japan is"), return_tensors="pt")
    routing = adapter.routing_features(unrelated["input_ids"], unrelated["attention_mask"])
    assert not routing.active.any()
    asked = chat_tokenizer(template.wrap("The founder of Hugging Face is"), return_tensors="pt")
    routing = adapter.routing_features(asked["input_ids"], asked["attention_mask"])
    assert routing.active[0, -1]                    # named by the user, the subject is in sight
    assert adapter.encoder.prompt_entities(template.split(asked["input_ids"][0].tolist())[0]) == ("Hugging Face",)
    restore()


def test_training_sees_each_edit_as_easyedit_asks_it_through_the_template(chat_tokenizer):
    variants = training_variants(EDITS, chat_hparams(chat_answer="all"), ChatTemplate(chat_tokenizer))
    assert variants[:len(EDITS)] == EDITS
    wrapped = variants[len(EDITS):]
    assert [v["prompt"] for v in wrapped] == [ChatTemplate(chat_tokenizer).wrap(e["prompt"]) for e in EDITS]
    assert [v["target_new"] for v in wrapped] == [e["target_new"] + "<|im_end|>" for e in EDITS]
    assert not any(ANSWER_TOKENS in v for v in variants)


@pytest.mark.parametrize("chat_answer, first", [("first", True), ("all", False)])
def test_with_chat_answer_first_the_wrapped_copy_trains_the_replys_first_token_only(chat_tokenizer, chat_answer,
                                                                                    first):
    hp = chat_hparams(chat_answer=chat_answer)
    variants = training_variants(EDITS, hp, ChatTemplate(chat_tokenizer))
    wrapped = variants[len(EDITS):]
    assert hp.chat_first_token is first
    assert [v.get(ANSWER_TOKENS) for v in wrapped] == [1 if first else None] * len(EDITS)
    batch = build_edit_batches(chat_tokenizer, variants, "cpu", max_buckets=1)[0]
    rows = batch.indices.tolist()
    targets = torch.bincount(batch.rows, minlength=len(rows)).tolist()
    for row, index in enumerate(rows):
        request = variants[index]
        answer = len(chat_tokenizer(request["prompt"] + " " + request["target_new"])["input_ids"]) - len(
            chat_tokenizer(request["prompt"])["input_ids"])
        cut = index >= len(EDITS) and first
        assert targets[row] == (1 if cut else answer)
        assert bool(batch.complete[row]) is not cut


def test_a_reply_is_cut_only_where_it_repeats_the_raw_answers_tokens(chat_tokenizer):
    template = ChatTemplate(chat_tokenizer)
    edit = EDITS[0]
    reply = dict(edit, prompt=template.wrap(edit["prompt"]), target_new=template.answer(edit["target_new"]))
    assert repeats_answer(chat_tokenizer, edit, reply)
    assert not repeats_answer(chat_tokenizer, edit, dict(reply, target_new=template.answer("Lisbon and more")))
    variants = training_variants([edit], chat_hparams(chat_answer="first"), template)
    assert variants[-1][ANSWER_TOKENS] == 1


def test_whole_replies_by_default_and_first_needs_the_key_scope_with_a_full_snap():
    assert chat_hparams().chat_answer == "all" and not chat_hparams().chat_first_token
    with pytest.raises(ValueError, match="chat_answer"):
        make_hparams(LLAMA_TEMPLATE, chat="auto", chat_answer="first")
    with pytest.raises(ValueError, match="chat_answer"):
        chat_hparams(chat_answer="first", scope_snap=0.5)
    with pytest.raises(ValueError, match="chat_answer"):
        chat_hparams(chat_answer="some")


def answered(model, tokenizer, prompt, target) -> bool:
    """EasyEdit's teacher-forced check: every target token of ``prompt + ' ' + target`` is the greedy prediction."""
    full = tokenizer(prompt + " " + target, return_tensors="pt")
    n = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        got = model(**full).logits[0].argmax(-1)[n - 1:-1].tolist()
    return got == full["input_ids"][0, n:].tolist()


@pytest.mark.parametrize("chat_answer", ["first", "all"])
def test_an_edit_holds_asked_raw_and_through_the_template_and_the_base_model_comes_back(chat_tokenizer, chat_answer):
    model = tiny_llama(len(chat_tokenizer), seed=3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _, restore = apply_memoe_to_model(model, chat_tokenizer, EDITS, chat_hparams(scope_stop_keys=True,
                                                                                 chat_answer=chat_answer))
    adapter = get_adapter(model)
    kinds = set(adapter.scope.key_kind.tolist())
    per_edit = torch.bincount(adapter.scope.edit_ids).tolist()
    answers = [len(chat_tokenizer(e["prompt"] + " " + e["target_new"])["input_ids"])
               - len(chat_tokenizer(e["prompt"])["input_ids"]) for e in EDITS]
    if chat_answer == "first":
        assert kinds == {PLAIN, TEMPLATE}               # the reply reads the raw answer's keys
        assert per_edit == [n + 1 for n in answers]     # one key per raw answer token, one at the generation prompt
    else:
        assert kinds == {PLAIN, TEMPLATE, IN_CHAT}      # raw keys, the generation prompt's, the reply's
        assert per_edit == [2 * n + 1 for n in answers]  # the reply's answer tokens and its turn's end too
    # one stop key per edit, after the raw answer: a reply cut after its first token is no answer's end
    assert adapter.scope.anti_keys.shape[0] == len(EDITS)
    for edit in EDITS:
        assert answered(model, chat_tokenizer, edit["prompt"], edit["target_new"]), edit
        assert answered(model, chat_tokenizer, adapter.template.wrap(edit["prompt"]), edit["target_new"]), edit
    if chat_answer == "first":   # the reply's tokens after the first act through the raw answer's keys
        edit = EDITS[0]
        wrapped = adapter.template.wrap(edit["prompt"])
        full = chat_tokenizer(wrapped + " " + edit["target_new"], return_tensors="pt")
        n = len(chat_tokenizer(wrapped)["input_ids"])
        found = adapter.scope.match(capture_inputs(adapter, full), kind=adapter.routing_features(
            full["input_ids"], full["attention_mask"]).kind)
        reply = slice(n, full["input_ids"].shape[1] - 1)   # positions predicting the reply's second token on
        later = found.key[0, reply]
        assert len(later) and bool((later >= 0).all())
        assert bool((found.similarity[0, reply] >= adapter.scope.threshold).all())
        assert set(adapter.scope.key_kind[later].tolist()) == {PLAIN}
        assert set(adapter.scope.edit_ids[later].tolist()) == {0}
    restore()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def capture_inputs(adapter, inputs):
    """The bypass input of one model call (the unedited model's: the adapter's layer reads what the layers below
    give)."""
    seen = []
    handle = adapter.base_module.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            adapter.model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_the_position_after_the_answer_goes_back_to_the_base_model(chat_tokenizer):
    """Stop keys: the answer's last token is an anti-key of its edit, so the position that follows the answer is out
    of scope. Without them, at a threshold every position passes, the answer's last token acts too (on a real model
    it resembles the keys, and repeats the answer's last token through the snap: "September12666")."""
    edit = EDITS[1]
    full = chat_tokenizer(edit["prompt"] + " " + edit["target_new"], return_tensors="pt")
    n = len(chat_tokenizer(edit["prompt"])["input_ids"])
    acting = {}
    for stop in (False, True):
        model = tiny_llama(len(chat_tokenizer), seed=3)
        _, restore = apply_memoe_to_model(model, chat_tokenizer, [edit],
                                          chat_hparams(scope_stop_keys=stop, chat="off", scope_threshold=-1.0))
        with get_adapter(model).recording() as outputs:
            model(**full)
        acting[stop] = (outputs[-1].routing[0, :, 0] >= 0).tolist()
        assert answered(model, chat_tokenizer, edit["prompt"], edit["target_new"])
        restore()
    assert all(acting[True][n - 1:-1]) and all(acting[False][n - 1:-1])   # every position predicting the answer
    assert acting[False][-1] and not acting[True][-1]                     # after the answer: only without stop keys


def test_a_system_prompt_or_an_earlier_turn_in_front_does_not_close_the_scope(chat_tokenizer):
    """Text before the question (a system prompt of the user's own, an earlier exchange) changes the conversation's
    template tokens and what comes before the question, not the question: at the reply's first position the scope
    reads the question's last own token, so the edit's expert still acts there, and its answer still comes out."""
    from memoe_plugin.eval.generation import CHAT_HISTORY, CHAT_SYSTEM
    model = tiny_llama(len(chat_tokenizer), seed=3)
    _, restore = apply_memoe_to_model(model, chat_tokenizer, EDITS, chat_hparams(scope_stop_keys=True))
    edit = EDITS[0]
    for system, history in ((None, ()), (CHAT_SYSTEM, ()), (None, CHAT_HISTORY)):
        messages = ([{"role": "system", "content": system}] if system else []) + list(history) + \
            [{"role": "user", "content": edit["prompt"]}]
        text = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = chat_tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with get_adapter(model).recording() as outputs:
            model(**inputs)
        assert outputs[-1].routing[0, -1, 0] >= 0, (system, history)      # in scope at the reply's first position
    other = chat_tokenizer.apply_chat_template([{"role": "system", "content": CHAT_SYSTEM},
                                                {"role": "user", "content": "What is the weather like today?"}],
                                               tokenize=False, add_generation_prompt=True)
    with get_adapter(model).recording() as outputs:
        model(**chat_tokenizer(other, return_tensors="pt", add_special_tokens=False))
    assert (outputs[-1].routing[0, :, 0] < 0).all()                       # a question about nothing edited: silent
    restore()


def test_a_saved_chat_adapter_reads_replies_as_it_was_trained_and_an_older_file_as_whole_replies(chat_tokenizer,
                                                                                               tmp_path):
    model = tiny_llama(len(chat_tokenizer), seed=3)
    apply_memoe_to_model(model, chat_tokenizer, EDITS[:2], chat_hparams(steps=5, chat_answer="first"))
    assert get_adapter(model).scope.chat_reads_plain
    path = save_adapter(model, tmp_path / "first.safetensors")
    remove_memoe(model)
    assert load_adapter(model, chat_tokenizer, path).scope.chat_reads_plain
    remove_memoe(model)
    older = rewrite(path, tmp_path / "older.safetensors",
                    change_document=lambda document: document["hparams"].pop("chat_answer"))
    adapter = load_adapter(model, chat_tokenizer, older)
    assert adapter.hparams.chat_answer == "all" and not adapter.scope.chat_reads_plain
    remove_memoe(model)
