"""``rewordings``: the edit prompt reworded by the model being edited, trained and keyed as the prompt is.

The rewordings must come from the model and the project's own text only (no prompt of an evaluation record reaches
training), be filtered to unfinished sentences that name the subject and not the answer, be reproducible without
touching the global RNG, and be made by the unedited model.
"""
import torch

from conftest import EDITS, make_hparams, tiny_llama
from memoe_plugin import apply_memoe_to_model, get_adapter
import memoe_plugin.apply as apply_module
import memoe_plugin.training.rewordings as rewordings
from memoe_plugin.training.rewordings import ASK, FEW_SHOT, agreeing, asking_texts, cleaned, sample_candidates

REQUEST = {"prompt": "The capital of Japan is", "target_new": "Warsaw", "subject": "Japan"}


def test_cleaned_keeps_unfinished_rewordings_that_name_the_subject():
    assert cleaned("Japan's capital city is ...", REQUEST) == "Japan's capital city is"
    assert cleaned('Here is the sentence: "Japan\'s capital city is..."', REQUEST) == "Japan's capital city is"
    assert cleaned("The seat of government of Japan is …\nmore text", REQUEST) == "The seat of government of Japan is"


def test_cleaned_drops_what_is_not_a_usable_rewording():
    assert cleaned("Japan's capital city is Tokyo.", REQUEST) is None          # finished: it answers
    assert cleaned("The capital city is ...", REQUEST) is None                  # no subject
    assert cleaned("japan's capital city is ...", REQUEST) is None              # not the subject as written
    assert cleaned("Japan's capital, not Warsaw, is ...", REQUEST) is None      # holds the new answer
    assert cleaned("The capital of Japan is ...", REQUEST) is None              # the prompt itself
    assert cleaned("Japan " + "and more words " * 6 + "...", REQUEST) is None   # far longer than the prompt


def test_the_model_is_asked_with_the_projects_text_and_the_edit_prompt_only(tokenizer):
    """What the model continues holds the project's instruction (or few-shot examples) and the edit prompt, nothing
    else of the request."""
    request = dict(REQUEST, rephrase_prompt="Where is the government of Japan? It is in",
                   locality={"neighborhood": {"prompt": "The capital of France is", "ground_truth": "Paris"}})
    (few,) = asking_texts(tokenizer, [request["prompt"]], chat=False)
    assert few == FEW_SHOT.format(prompt=request["prompt"])
    assert "government" not in few and "France" not in few


def test_training_sees_only_the_requests_and_their_rewordings(tokenizer, monkeypatch):
    """With ``rewordings``, what is trained is the edit prompts and what the model wrote for them (here a fixed
    candidate list stands for the sampler): each rewording keeps its edit's id, subject and answer, and no evaluation
    prompt of the request reaches training. The sampler runs on the unedited model (the bypass off)."""
    model = tiny_llama(len(tokenizer))
    requests = [dict(e, rephrase_prompt=f"Someone asked: {e['prompt']}",
                     locality={"neighborhood": {"prompt": "The capital of France is", "ground_truth": "Paris"}})
                for e in EDITS]
    asked, trained = [], []

    def fake_sample(model, tokenizer, texts, samples, seed, **kwargs):
        asked.extend(texts)
        assert get_adapter(model).bypass.enabled is False
        return [[f"{r['subject']}, in other words, ...", "no subject here ...", f"{r['subject']} {r['target_new']} ..."]
                for r in EDITS]

    real_train = apply_module.train_experts

    def recording_train(adapter, batch, **kwargs):
        trained.extend(batch)
        return real_train(adapter, batch, **kwargs)

    monkeypatch.setattr(rewordings, "sample_candidates", fake_sample)
    monkeypatch.setattr(rewordings, "agreeing", lambda model, tok, prompt, candidates: [True] * len(candidates))
    monkeypatch.setattr(apply_module, "train_experts", recording_train)
    hp = make_hparams(rewordings=2, steps=2)
    apply_memoe_to_model(model, tokenizer, [{k: r[k] for k in ("prompt", "target_new", "subject")} | {
        "rephrase_prompt": r["rephrase_prompt"], "locality": r["locality"]} for r in requests], hp)
    assert all(text == FEW_SHOT.format(prompt=e["prompt"]) for text, e in zip(asked, EDITS))
    prompts = {r["prompt"] for r in trained}
    expected = {e["prompt"] for e in EDITS} | {f"{e['subject']}, in other words," for e in EDITS}
    assert prompts == expected
    for r in trained:
        edit = EDITS[r["_edit"]]
        assert r["target_new"] == edit["target_new"] and r["subject"] == edit["subject"]
        assert edit["subject"] in r["prompt"]
    get_adapter(model).detach()


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tokenizer):
    model = tiny_llama(len(tokenizer)).eval()
    state = torch.random.get_rng_state()
    first = sample_candidates(model, tokenizer, ["The capital of Japan is", "Toko Yasuda plays the"], 3, seed=7,
                              max_new_tokens=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = sample_candidates(model, tokenizer, ["The capital of Japan is", "Toko Yasuda plays the"], 3, seed=7,
                              max_new_tokens=5)
    assert first == again and [len(c) for c in first] == [3, 3]


def test_a_candidate_agrees_with_itself_and_the_check_reads_next_tokens(tokenizer):
    model = tiny_llama(len(tokenizer)).eval()
    assert agreeing(model, tokenizer, REQUEST["prompt"], [REQUEST["prompt"]]) == [True]
    assert len(agreeing(model, tokenizer, REQUEST["prompt"], ["Japan, its capital is", "Toko"])) == 2


def test_a_chat_tokenizer_is_asked_through_its_template():
    class Chat:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<user>" + messages[0]["content"] + "<assistant>"
    (text,) = asking_texts(Chat(), [REQUEST["prompt"]], chat=True)
    assert text == "<user>" + ASK.format(prompt=REQUEST["prompt"]) + "<assistant>"
