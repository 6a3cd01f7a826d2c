"""Tests for memoe_plugin.routing.extractors (knowledge-anchor / entity extraction)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import timeit
import warnings
from pathlib import Path

import pytest

from memoe_plugin.routing import extractors
from memoe_plugin.routing.extractors import (
    NLTK_DATA_PACKAGES,
    Entity,
    NLTKDataMissingError,
    NLTKExtractor,
    OfflineExtractor,
    make_extractor,
    missing_nltk_data,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
NLTK_MISSING = missing_nltk_data()
needs_nltk_data = pytest.mark.skipif(
    bool(NLTK_MISSING),
    reason="NLTK NER data missing: " + ", ".join(NLTK_MISSING)
    + " (python -m nltk.downloader " + " ".join(NLTK_DATA_PACKAGES) + ")",
)


def texts(ents):
    return [e.text for e in ents]


def check_offsets(text, ents):
    prev_end = -1
    for e in ents:
        assert isinstance(e, Entity)
        assert text[e.start : e.end] == e.text
        assert e.text and e.text == e.text.strip()
        assert e.start >= prev_end  # in order of appearance, no overlap
        prev_end = e.end


# ---------------------------------------------------------------------------
# offline extractor
# ---------------------------------------------------------------------------

OFFLINE_CASES = [
    # ZsRE-shaped questions
    ("What university did Watts Humphrey attend?", ["Watts Humphrey"]),
    ("Which family does Epaspidoceras belong to?", ["Epaspidoceras"]),
    ("What is the name of the father of Marie Curie?", ["Marie Curie"]),
    ("When was the inception of IAAF Combined Events Challenge?",
     ["IAAF Combined Events Challenge"]),
    ("What was the cause of Mavis Villiers's death?", ["Mavis Villiers"]),
    ("Who designed the iPhone and the F-16 for McDonald's?",
     ["iPhone", "F-16", "McDonald"]),
    ("When did the 2012 Summer Olympics start?", ["2012 Summer Olympics"]),
    ("Which lady Fakhr-un-Nissa was born to?", ["Fakhr-un-Nissa"]),
    ("Who was the teacher of Leonardo da Vinci?", ["Leonardo da Vinci"]),
    ("What is the status of Antônio Cardoso in São Paulo?",
     ["Antônio Cardoso", "São Paulo"]),
    # CounterFact-shaped statements
    ("The mother tongue of Danielle Darrieux is", ["Danielle Darrieux"]),
    ("Toko Yasuda, the", ["Toko Yasuda"]),
    ("Apple A5 is developed by", ["Apple A5"]),
    ("In Wales, an official language is", ["Wales"]),
    ("Autonomous University of Madrid, which is located in",
     ["Autonomous University of Madrid"]),
    ("Bank of the Philippine Islands is headquartered in",
     ["Bank of the Philippine Islands"]),
    ("John F. Kennedy died in St. Louis, U.S.", ["John F. Kennedy", "St. Louis", "U.S."]),
    ("Procter & Gamble and AT&T are based in", ["Procter & Gamble", "AT&T"]),
    ("What is the twin city of Shanghai? It is", ["Shanghai"]),
    ("Did Watts Humphrey and Marie Curie meet?", ["Watts Humphrey", "Marie Curie"]),
    # nothing to find
    ("The mother tongue of the author is", []),
    ("What Is The Name?", []),
    ("", []),
    ("   ", []),
]


@pytest.mark.parametrize("text,expected", OFFLINE_CASES)
def test_offline_extraction(text, expected):
    ents = OfflineExtractor()(text)
    assert texts(ents) == expected
    check_offsets(text, ents)


def test_offline_offsets_are_original_text():
    text = 'He said "Marie Curie" lived in  Paris ,  France.'
    ents = OfflineExtractor()(text)
    assert texts(ents) == ["Marie Curie", "Paris", "France"]
    check_offsets(text, ents)
    assert ents[0] == Entity(9, 20, "Marie Curie")


def test_offline_commas_and_and_do_not_join():
    assert texts(OfflineExtractor()("Paris, France and Berlin")) == ["Paris", "France", "Berlin"]


def test_offline_trailing_connector_not_included():
    assert texts(OfflineExtractor()("He studied at University of")) == ["University"]


@pytest.mark.parametrize(
    "prompt,answer",
    [
        ("The mother tongue of Danielle Darrieux is", "English"),
        ("Apple A5 is developed by", "Google"),
        ("Toko Yasuda, the", "Japanese"),
        ("In Wales, an official language is", "Welsh"),
        ("Autonomous University of Madrid, which is located in", "Sweden"),
        ("What university did Watts Humphrey attend?", "University of Michigan"),
        ("Which family does Epaspidoceras belong to?", "Noctuidae"),
        ("What is the name of the father of Marie Curie?", "Władysław Skłodowski"),
        ("Leonardo da Vinci's teacher was", "Andrea del Verrocchio"),
        ("The mother tongue of the author is", "French"),
    ],
)
def test_offline_prefix_property(prompt, answer):
    x = OfflineExtractor()
    p_ents = x(prompt)
    full_ents = x(prompt + " " + answer)
    assert full_ents[: len(p_ents)] == p_ents
    assert len(full_ents) > len(p_ents)  # the answer is an entity of its own


def test_offline_is_fast():
    x = OfflineExtractor()
    prompt = "What university did Watts Humphrey attend after leaving the University of Madrid?"
    n = 2000
    best = min(timeit.repeat(lambda: x(prompt), number=n, repeat=3)) / n
    # typically ~10-20 us; generous bound so slow CI machines do not flake
    assert best < 200e-6, f"{best * 1e6:.1f} us per call"


# ---------------------------------------------------------------------------
# factory / NLTK data handling
# ---------------------------------------------------------------------------

def test_make_extractor_unknown_backend():
    with pytest.raises(ValueError) as exc:
        make_extractor("bogus")
    for choice in ("offline", "nltk", "auto"):
        assert choice in str(exc.value)


def test_make_extractor_offline():
    x = make_extractor("offline")
    assert isinstance(x, OfflineExtractor) and x.name == "offline"


def test_nltk_data_package_names():
    assert NLTK_DATA_PACKAGES == (
        "punkt_tab", "averaged_perceptron_tagger_eng", "maxent_ne_chunker_tab", "words",
    )
    assert extractors.NLTK_INSTALL_COMMAND == (
        "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng "
        "maxent_ne_chunker_tab words"
    )


@pytest.fixture
def empty_nltk_path(monkeypatch, tmp_path):
    nltk_data = pytest.importorskip("nltk.data")
    monkeypatch.setattr(nltk_data, "path", [str(tmp_path)])
    return tmp_path


def test_missing_nltk_data_with_empty_path(empty_nltk_path):
    assert missing_nltk_data() == list(NLTK_DATA_PACKAGES)
    assert list(empty_nltk_path.iterdir()) == []  # nothing was downloaded


def test_auto_falls_back_and_warns_once(empty_nltk_path, monkeypatch):
    monkeypatch.setattr(extractors, "_auto_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = make_extractor("auto")
        second = make_extractor("auto")
    assert isinstance(first, OfflineExtractor) and isinstance(second, OfflineExtractor)
    assert len(caught) == 1
    msg = str(caught[0].message)
    for pkg in NLTK_DATA_PACKAGES:
        assert pkg in msg
    assert "nltk.downloader" in msg and "offline" in msg


def test_auto_with_patched_missing(monkeypatch):
    monkeypatch.setattr(extractors, "_auto_fallback_warned", False)
    monkeypatch.setattr(extractors, "missing_nltk_data", lambda: ["words"])
    with pytest.warns(RuntimeWarning, match="words"):
        assert isinstance(make_extractor("auto"), OfflineExtractor)


def test_nltk_extractor_raises_when_data_missing(empty_nltk_path):
    with pytest.raises(NLTKDataMissingError) as exc:
        NLTKExtractor()
    msg = str(exc.value)
    for pkg in NLTK_DATA_PACKAGES:
        assert pkg in msg
    assert "nltk.downloader" in msg
    with pytest.raises(NLTKDataMissingError):
        make_extractor("nltk")


def test_align_tokens_handles_treebank_quotes():
    from nltk.tokenize import NLTKWordTokenizer  # needs no downloaded data

    text = 'He said "Apple" isn\'t in Paris (France)...'
    toks = NLTKWordTokenizer().tokenize(text)
    assert "``" in toks and "''" in toks
    spans = extractors.nltk_ner._align_tokens(toks, text)
    assert None not in spans
    got = [text[s:e] for s, e in spans]
    assert got == [t if t not in ("``", "''") else '"' for t in toks]


# A tiny, made-up NLTK data tree (trained on three sentences) exercising the
# whole NLTKExtractor pipeline when the real data cannot be downloaded.  Runs
# in a subprocess so NLTK's process-wide caches never see the fake data.
_FAKE_NLTK = textwrap.dedent(
    r'''
    import contextlib, io, json, os, sys
    root = sys.argv[1]
    import nltk
    from nltk.tree import Tree
    os.makedirs(root)
    nltk.data.path[:] = [root]  # nltk's write sandbox only allows data roots
    os.makedirs(f"{root}/corpora/words")
    for n in ("en", "en-basic"):
        with open(f"{root}/corpora/words/{n}", "w") as f:
            f.write("the\nof\nmother\ntongue\nis\nwas\nborn\nin\n")
    os.makedirs(f"{root}/tokenizers/punkt_tab/english")
    for fn in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt",
               "ortho_context.tab"):
        open(f"{root}/tokenizers/punkt_tab/english/{fn}", "w").close()
    sents = [
        [("Marie", "NNP"), ("Curie", "NNP"), ("was", "VBD"), ("born", "VBN"),
         ("in", "IN"), ("Warsaw", "NNP"), (".", ".")],
        [("The", "DT"), ("mother", "NN"), ("tongue", "NN"), ("of", "IN"),
         ("Danielle", "NNP"), ("Darrieux", "NNP"), ("is", "VBZ")],
        [("``", "``"), ("Apple", "NNP"), ("''", "''"), ("is", "VBZ"), ("in", "IN"),
         ("Paris", "NNP"), ("?", ".")],
    ]
    spans = [{0: 2, 5: 1}, {4: 2}, {1: 1, 5: 1}]
    try:
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.chunk.named_entity import NEChunkParser
        from nltk.classify.maxent import save_maxent_params
        t = PerceptronTagger(load=False)
        t.train([list(s) for s in sents], nr_iter=5)
        t.save_to_json(lang="eng", loc=f"{root}/taggers/averaged_perceptron_tagger_eng/")
        def tree(s, ents):
            out, i = [], 0
            while i < len(s):
                if i in ents:
                    out.append(Tree("NE", s[i:i + ents[i]])); i += ents[i]
                else:
                    out.append(s[i]); i += 1
            return Tree("S", out)
        with contextlib.redirect_stdout(io.StringIO()):
            p = NEChunkParser([tree(s, e) for s, e in zip(sents, spans)] * 3)
            c = p._tagger._classifier; enc = c._encoding
            os.makedirs(f"{root}/chunkers/maxent_ne_chunker_tab")
            save_maxent_params(c._weights, enc._mapping, enc._labels, enc._alwayson or {},
                               tab_dir=f"{root}/chunkers/maxent_ne_chunker_tab/english_ace_binary")
    except Exception as exc:  # this nltk cannot build fake data: not our bug
        print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
    from memoe_plugin.routing.extractors import NLTKExtractor, make_extractor, missing_nltk_data
    out = {"missing": missing_nltk_data(), "auto": make_extractor("auto").name, "res": []}
    x = NLTKExtractor()
    for text in ["Marie Curie was born in Warsaw.",
                 "The mother tongue of Danielle Darrieux is",
                 'He said "Apple" is in Paris? Marie Curie was born in Warsaw.']:
        out["res"].append([text, [list(e) for e in x(text)]])
    print(json.dumps(out))
    '''
)


def test_nltk_extractor_pipeline_on_fake_data(tmp_path):
    pytest.importorskip("nltk")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_NLTK, str(tmp_path / "nltk_data")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip("cannot build fake NLTK data with this nltk: " + out["skip"])
    assert out["missing"] == [] and out["auto"] == "nltk"
    for text, ents in out["res"]:
        for start, end, etext in ents:
            assert text[start:end] == etext
    found = [[e[2] for e in ents] for _, ents in out["res"]]
    assert "Marie Curie" in found[0] and "Warsaw" in found[0]
    assert "Danielle Darrieux" in found[1]
    assert {"Apple", "Paris", "Marie Curie", "Warsaw"} <= set(found[2])


# ---------------------------------------------------------------------------
# tests needing the real NLTK data (skipped when it is not installed)
# ---------------------------------------------------------------------------

@needs_nltk_data
def test_nltk_extractor_real_data():
    x = NLTKExtractor()
    assert x.name == "nltk"
    for text in [
        "Marie Curie was born in Warsaw.",
        'He said "Apple" is in Paris.',
        "The mother tongue of Danielle Darrieux is",
    ]:
        check_offsets(text, x(text))
    assert any("Curie" in e.text for e in x("Marie Curie was born in Warsaw."))
    assert isinstance(make_extractor("auto"), NLTKExtractor)


# ---------------------------------------------------------------------------
# subject-hit rate on the real benchmark files (skipped when absent)
# ---------------------------------------------------------------------------

def _hit(subject, ents):
    return any(subject == e or subject in e or e in subject for e in ents)


def _load(name):
    path = DATA_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# (file, prompt key, measured offline hit rate -> floor, exact-match floor)
# measured: zsre_mend_eval_portability_gpt4 1.000 / exact 0.846;
#           ZsRE-test-all 1.000 / 0.840; counterfact-edit 0.995 / 0.910
DATASETS = [
    ("zsre_mend_eval_portability_gpt4.json", "src", 0.95, 0.78),
    ("ZsRE-test-all.json", "prompt", 0.95, 0.78),
    ("counterfact-edit.json", "prompt", 0.95, 0.85),
]


@pytest.mark.parametrize("name,key,hit_floor,exact_floor", DATASETS)
def test_offline_subject_hit_rate(name, key, hit_floor, exact_floor):
    records = _load(name)
    assert records and key in records[0] and "subject" in records[0]
    x = OfflineExtractor()
    hits = exact = 0
    for r in records:
        ents = texts(x(r[key]))
        hits += _hit(r["subject"], ents)
        exact += r["subject"] in ents
    n = len(records)
    assert hits / n >= hit_floor, f"hit rate {hits / n:.3f}"
    assert exact / n >= exact_floor, f"exact rate {exact / n:.3f}"


def test_offline_prefix_property_on_counterfact():
    records = _load("counterfact-edit.json")
    x = OfflineExtractor()
    bad = []
    for r in records:
        p_ents = x(r["prompt"])
        for ans in (r["target_new"], r["ground_truth"]):
            if x(r["prompt"] + " " + ans)[: len(p_ents)] != p_ents:
                bad.append((r["prompt"], ans))
    assert not bad, bad[:5]


@needs_nltk_data
@pytest.mark.parametrize("name,key", [(d[0], d[1]) for d in DATASETS])
def test_nltk_subject_hit_rate(name, key):
    records = _load(name)[:300]
    x = NLTKExtractor()
    hits = sum(_hit(r["subject"], texts(x(r[key]))) for r in records)
    # not measured here (no NLTK data on the dev machine): a loose floor
    assert hits / len(records) >= 0.5


def test_old_nltk_is_refused_with_the_upgrade_command(monkeypatch):
    import nltk
    from memoe_plugin.routing.extractors import NLTKDataMissingError, NLTKExtractor
    monkeypatch.setattr(nltk, "__version__", "3.6.5")
    with pytest.raises(NLTKDataMissingError, match=r"nltk 3\.6\.5 is too old.*nltk>=3\.9.*nltk\.downloader"):
        NLTKExtractor()


_NLTK_EDIT = _FAKE_NLTK + textwrap.dedent(
    r'''
    sys.path.insert(0, os.environ["MEMOE_TESTS"])
    import torch
    from conftest import EDITS, _train_tokenizer, make_hparams, tiny_llama
    from memoe_plugin import apply_memoe_to_model, get_adapter
    tok = _train_tokenizer()
    model = tiny_llama(len(tok))
    _, restore = apply_memoe_to_model(model, tok, EDITS, make_hparams(anchor_backend="nltk", steps=40))
    adapter = get_adapter(model)
    ids = tok("Marie Curie was born in Warsaw")["input_ids"]
    print(json.dumps({"extractor": type(adapter.encoder.extractor).__name__,
                      "entities": list(adapter.encoder.prompt_entities(ids)),
                      "accuracy": adapter.last_report.target_accuracy}))
    '''
)


def test_nltk_backend_drives_a_memoe_edit(tmp_path):
    pytest.importorskip("nltk")
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, MEMOE_TESTS=str(tests_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _NLTK_EDIT, str(tmp_path / "nltk_data")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip("cannot build fake NLTK data with this nltk: " + out["skip"])
    assert out["extractor"] == "NLTKExtractor"
    assert {"Marie Curie", "Warsaw"} <= set(out["entities"])
    assert out["accuracy"] == 1.0
