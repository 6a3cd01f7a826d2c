"""memoe-tune: the trials drawn, the winner chosen by the stated criterion, and the file written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from memoe_plugin.eval.compare import CompareError
from memoe_plugin.eval.compare.search import (GENERATION, MIN_EDIT_GAIN, SAME_SUBJECT, SEARCH_SPACES, edit_gain, edits,
                                              same_setting, score, search_space, select_best, shipped_settings,
                                              trial_settings)
from memoe_plugin.eval.compare.tuning import brief, read_trials, replace_top_level, tune, tuned_yaml


def row(rel, gen, loc, status="complete"):
    return {"status": status, "reliability": rel, "generality": gen, "locality": loc}


def test_the_criterion_is_the_mean_of_reliability_generality_and_locality():
    assert score(row(90, 60, 30)) == 60.0
    assert score(row(90, 60, 30, status="error")) == float("-inf")
    assert score(row(90, None, 30)) == float("-inf") and score(None) == float("-inf")


def test_trials_start_with_the_shipped_file_and_are_reproducible_distinct_grid_points():
    space = {"lr": [1, 2, 3], "steps": [10, 20]}
    trials = trial_settings(space, 4, seed=0)
    assert trials[0] == {} and len(trials) == 4
    assert all(t in [{"lr": a, "steps": b} for a in (1, 2, 3) for b in (10, 20)] for t in trials[1:])
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 4
    assert trials == trial_settings(space, 4, seed=0) != trial_settings(space, 4, seed=1)
    assert len(trial_settings(space, 50)) == 7                  # the whole grid, once, when the budget exceeds it
    big = {"a": list(range(10)), "b": list(range(10))}          # 100 points: every budget a prefix of a larger one
    assert all(trial_settings(big, k) == trial_settings(big, 40)[:k] for k in (1, 2, 6, 7, 12, 30))
    with pytest.raises(CompareError):
        trial_settings(space, 0)
    for method, space in SEARCH_SPACES.items():                  # every space is a non-empty grid
        assert space and all(isinstance(v, list) and v for v in space.values()), method


def test_no_trial_repeats_the_shipped_file_and_other_draws_stay_as_they_were():
    space = {"layers": [[3], [5], [8], [12]], "v_lr": [0.1, 0.5], "steps": [12, 25]}
    plain = trial_settings(space, 16)                           # the whole 16-point grid in draw order
    shipped_point = plain[3]
    # the shipped file as PyYAML reads it (a float written "5e-1" stays a string); its other keys do not matter
    shipped = {"layers": list(shipped_point["layers"]), "v_lr": f"{shipped_point['v_lr']:.0e}",
               "steps": shipped_point["steps"], "alg_name": "ROME"}
    kept = trial_settings(space, 6, shipped=shipped)
    assert shipped_point not in kept and len(kept) == 6
    assert kept == [{}] + [p for p in plain[1:] if p != shipped_point][:5]   # the rest of the draw is unchanged
    assert trial_settings(space, 3, shipped=shipped) == plain[:3]         # a prefix that never met it: unchanged
    assert trial_settings(space, 50, shipped=shipped) == [{}] + [p for p in
                                                              trial_settings(space, 50)[1:] if p != shipped_point]
    assert trial_settings(space, 6, shipped={"v_lr": 0.5}) == trial_settings(space, 6)   # a key it lacks: kept
    assert same_setting("5e-1", 0.5) and same_setting([5], [5.0]) and not same_setting([5], [5, 6])
    assert not same_setting(True, 1) and same_setting("x", "x") and not same_setting("x", 1)


def test_the_tuner_reads_the_shipped_settings_it_keeps_out(tmp_path):
    path = tmp_path / "M.yaml"
    path.write_text("alg_name: ROME\nlayers: [5]\nv_lr: 5e-1\n")
    assert shipped_settings(path) == {"alg_name": "ROME", "layers": [5], "v_lr": "5e-1"}
    assert shipped_settings(tmp_path / "missing.yaml") is None
    path.write_text("[unclosed")
    assert shipped_settings(path) is None


def test_every_searched_key_is_a_key_of_the_methods_shipped_file():
    """A misspelt knob would be added to the YAML, ignored by EasyEdit, and 'tuned' without effect."""
    from memoe_plugin.eval.compare.methods import hparams_path_for
    from memoe_plugin.hparams import flatten_sections
    for method, space in SEARCH_SPACES.items():
        shipped = yaml.safe_load(hparams_path_for(method, None, {}).read_text())
        shipped = flatten_sections(shipped) if method == "MEMoE" else shipped      # its sections, as flat keys
        assert set(space) <= set(shipped), (method, set(space) - set(shipped))


def test_select_best_prefers_the_higher_mean_and_the_earlier_trial_on_ties():
    results = [({}, row(100, 50, 90)), ({"lr": 1}, row(100, 80, 60)), ({"lr": 2}, row(100, 100, 50)),
               ({"lr": 3}, None)]                                 # 80.0, 80.0, 83.3, failed
    assert select_best(results)[0] == 2
    results[2] = ({"lr": 2}, row(100, 100, 40))                  # 80.0: a tie with trials 0 and 1
    index, settings, best = select_best(results)
    assert index == 0 and settings == {}
    results[1] = ({"lr": 1}, row(100, 90, 60))                   # 83.3 beats 80.0
    assert select_best(results)[:2] == (1, {"lr": 1})


def test_a_trial_that_leaves_the_model_unedited_does_not_win_on_locality_alone():
    """FT-L's first search picked 10 steps at lr 1e-4 (14.5 / 18.8 / 100) over trials that edited."""
    def with_pre(rel, gen, loc, pre):
        return {**row(rel, gen, loc), "pre_reliability": pre}
    no_op, edit = with_pre(14.5, 18.8, 100.0, 12.0), with_pre(60.0, 40.0, 30.0, 12.0)
    assert score(no_op) > score(edit)                             # 44.4 against 43.3 by the criterion alone
    assert edit_gain(no_op) == pytest.approx(2.5) and not edits(no_op) and edits(edit)
    assert select_best([({}, no_op), ({"lr": 1}, edit)])[0] == 1
    assert edits(with_pre(12.0 + MIN_EDIT_GAIN, 0, 0, 12.0))      # the boundary counts as an edit
    none_edit = [({}, with_pre(12, 10, 90, 12.0)), ({"lr": 1}, no_op)]     # none edits: the shipped file stays
    assert select_best(none_edit)[:2] == (0, {})
    assert edits(row(14.5, 18.8, 100.0)) and edit_gain(row(1, 1, 1)) is None   # older rows: no pre score


def test_the_summary_row_carries_the_unedited_models_reliability():
    from memoe_plugin.eval.metrics import aggregate
    metrics = [{"pre": {"rewrite_acc": [0.25]}, "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5]}},
               {"pre": {"rewrite_acc": [0.75]}, "post": {"rewrite_acc": [1.0], "rephrase_acc": [1.0]}}]
    out = aggregate(metrics)
    assert out["pre_reliability"] == pytest.approx(50.0) and out["reliability"] == pytest.approx(100.0)
    assert aggregate([{"post": {"rewrite_acc": [1.0]}}])["pre_reliability"] is None


def test_tune_runs_each_trial_on_the_dev_split_and_writes_the_winner(tmp_path):
    seen = []

    def fake_compare(argv, **_):
        """Scores a trial by its lr: the closer to 5e-4, the better (FT-L's shipped file has lr 5e-4)."""
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        sets = {}
        for i, a in enumerate(argv):
            if a == "--set":
                key, value = argv[i + 1].split("=", 1)
                sets[key.split(".", 1)[1]] = json.loads(value)
        lr = sets.get("lr", 5e-4)
        steps = sets.get("num_steps", 25)
        generality = 100 - abs(lr - 1e-3) * 1e4 - abs(steps - 50) * 0.1
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps([row(100.0, generality, 90.0)]))
        return 0
    assert tune(["--methods", "FT-L", "--trials", "6", "--out", str(tmp_path), "--stats-text", "x.txt"],
                compare_main=fake_compare) == 0
    assert len(seen) == 6 and all("--split" in a and a[a.index("--split") + 1] == "dev" for a in seen)
    assert all("--stats-text" in a for a in seen)                # other options go to memoe-compare
    trials = [json.loads((tmp_path / "trials" / "FT-L" / f"{i:02d}" / "trial.json").read_text()) for i in range(6)]
    scores = [100 - abs(t.get("lr", 5e-4) - 1e-3) * 1e4 - abs(t.get("num_steps", 25) - 50) * 0.1 for t in trials]
    best = max(range(6), key=lambda i: (scores[i], -i))
    tuned = (tmp_path / "tuned" / "FT-L.yaml").read_text()
    config = yaml.safe_load(tuned)
    for key, value in trials[best].items():
        assert config[key] == value
    assert config["alg_name"] == "FT" and config["objective_optimization"] == "prompt_last"
    assert "tuned by memoe-tune on the dev split" in tuned and "Criterion: mean of reliability" in tuned
    assert f"| {best} (best) |" in (tmp_path / "tuning.md").read_text()
    # A second memoe-tune run into the same folder (another method, e.g. in parallel): the report keeps both.
    assert tune(["--methods", "FT-M", "--trials", "2", "--out", str(tmp_path)], compare_main=fake_compare) == 0
    report = (tmp_path / "tuning.md").read_text()
    assert "## FT-L: trial" in report and "## FT-M: trial" in report
    # A smaller budget resumes the same trials; a folder drawn with other settings is refused, not resumed.
    assert tune(["--methods", "FT-L", "--trials", "3", "--out", str(tmp_path)], compare_main=fake_compare) == 0
    assert all("--resume" not in a for a in seen[:6])
    (tmp_path / "trials" / "FT-L" / "01" / "trial.json").write_text(json.dumps({"lr": 123}))
    with pytest.raises(CompareError, match="other settings"):
        tune(["--methods", "FT-L", "--trials", "3", "--out", str(tmp_path)], compare_main=fake_compare)
    with pytest.raises(CompareError, match="no search space"):
        tune(["--methods", "MEND", "--out", str(tmp_path)], compare_main=fake_compare)


def test_the_python_api_returns_each_methods_trials_and_winner(tmp_path):
    """tune_methods(TuneOptions(...)) is what the command runs; it returns what it chose, not an exit code."""
    from memoe_plugin.eval.compare.methods import hparams_path_for
    from memoe_plugin.eval.compare.tuning import TuneOptions, tune_methods
    shipped_lr = shipped_settings(hparams_path_for("FT-M", None, {}))["lr"]

    def fake_compare(argv, **_):
        sets = dict(a.split("=", 1) for a in argv[argv.index("--methods"):] if "=" in a and "." in a.split("=")[0])
        lr = json.loads(sets.get("FT-M.lr", json.dumps(shipped_lr)))
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps([row(100.0, 100 - abs(lr - 1e-3) * 1e4, 90.0)]))
        return 0
    found = tune_methods(TuneOptions(methods="FT-M", trials=3, out=str(tmp_path)), compare_main=fake_compare)
    result = found["FT-M"]
    assert len(result.trials) == 3 and result.tuned_file == tmp_path / "tuned" / "FT-M.yaml"
    scores = [100 - abs(s.get("lr", shipped_lr) - 1e-3) * 1e4 for s, _ in result.trials]
    assert result.best == max(range(3), key=lambda i: (scores[i], -i))
    assert result.settings == result.trials[result.best][0]
    assert yaml.safe_load(result.tuned_file.read_text())["lr"] == result.settings.get("lr", shipped_lr)


def test_the_tuned_file_keeps_the_shipped_comments_and_changes_only_the_tuned_keys(tmp_path):
    base = tmp_path / "X.yaml"
    base.write_text("# why these settings\nalg_name: X\nlayers:\n- 4\n- 5   # mapped from 32 layers\n"
                    "lr: 1e-6  # EasyEdit's\n\n# Output\nresults_dir: ./results\n")
    args = type("A", (), {"data": "zsre", "num_edits": 30, "batch_size": 30})()
    text = tuned_yaml("X", base, {"layers": [8], "lr": 1e-4, "new_key": True}, row(90.0, 60.0, 99.0), 12, args)
    assert yaml.safe_load(text) == {"alg_name": "X", "layers": [8], "lr": 1e-4, "results_dir": "./results",
                                    "new_key": True}
    assert "# why these settings" in text and "# Output" in text and "EasyEdit's" not in text
    assert text.startswith("# X, tuned by memoe-tune") and "reliability 90.0" in text
    base.write_text(text)                                        # tuning a tuned file: one header, not two
    again = tuned_yaml("X", base, {}, row(91.0, 60.0, 99.0), 12, args)
    assert again.count("tuned by memoe-tune") == 1 and yaml.safe_load(again) == yaml.safe_load(text)
    assert replace_top_level("a: 1\nb: 2\n", "a", [1, 2]) == "a:\n- 1\n- 2\nb: 2\n"


def test_the_summary_says_how_each_file_was_chosen(tmp_path):
    from memoe_plugin.eval.compare.methods import hparams_origin
    args = type("A", (), {"data": "zsre-knowedit", "num_edits": 30, "batch_size": 30})()
    base = tmp_path / "X.yaml"
    base.write_text("# from EasyEdit's llama-7b.yaml\nalg_name: X\nlr: 1\n# later: tuned by memoe-tune? no\n")
    assert hparams_origin(base) == "as shipped (not tuned by memoe-tune)"     # only the header counts
    base.write_text(tuned_yaml("X", base, {"lr": 2}, row(90.0, 60.0, 99.0), 12, args))
    assert hparams_origin(base) == "tuned by memoe-tune (12 trials, 30 zsre-knowedit dev edits)"
    base.write_text("# Chosen on the dev split only\nalg_name: X\n")
    assert hparams_origin(base).startswith("chosen on the dev split")
    from types import SimpleNamespace
    from memoe_plugin.eval.compare.easyedit_backend import EasyEditBackend
    backend = SimpleNamespace(overrides={"X": {"lr": 1, "layers": [2]}}, hparams_paths={"X": base, "Y": base})
    assert EasyEditBackend.origin(backend, "X").endswith(", with --set layers, lr")      # --set is said too
    assert "--set" not in EasyEditBackend.origin(backend, "Y")


def test_module_lists_are_shortened_in_the_report():
    names = [f"model.layers.{n}.mlp.gate_proj" for n in (10, 11, 12)] + [f"model.layers.{n}.mlp.up_proj" for n in (16, 17, 19)]
    assert json.loads(brief({"inner_params": names, "lr": 1e-4})) == {
        "inner_params": ["model.layers.{10..12}.mlp.gate_proj", "model.layers.{16..17}.mlp.up_proj",
                         "model.layers.19.mlp.up_proj"], "lr": 1e-4}
    assert brief({"layers": [4, 5, 6, 7]}) == '{"layers": [4, 5, 6, 7]}' and brief({}) == "shipped"


def test_a_sequential_search_runs_the_sequential_protocol_and_installs_the_sequential_file(tmp_path, monkeypatch):
    """Files tuned with rollback after each chunk are not files tuned without it: a sequential search runs
    every trial under the sequential protocol (chunks of 10), starts from the sequential file where there is
    one, installs into hparams/compare/smollm2-135m-sequential/ and leaves the batch file alone; and
    memoe-compare --protocol sequential then reads that file first."""
    from memoe_plugin.eval.compare import methods
    from memoe_plugin.eval.compare.methods import hparams_origin, hparams_path_for

    shipped = tmp_path / "shipped"
    (shipped / "smollm2-135m").mkdir(parents=True)
    batch_file = shipped / "smollm2-135m" / "UltraEdit.yaml"
    batch_file.write_text(hparams_path_for("UltraEdit", None, {}).read_text())
    monkeypatch.setattr(methods, "compare_hparams_dir", lambda model: shipped / model)
    seen = []

    def fake_compare(argv, **_):
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        lr = next((json.loads(argv[i + 1].split("=", 1)[1]) for i, a in enumerate(argv)
                   if a == "--set" and argv[i + 1].startswith("UltraEdit.lr=")), 1e-4)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps([row(100.0, 50.0, 100.0 - abs(lr - 1e-5) * 1e5)]))
        return 0
    before = batch_file.read_text()
    assert tune(["--methods", "UltraEdit", "--trials", "4", "--protocol", "sequential", "--data", "zsre-knowedit",
                 "--num-edits", "200", "--out", str(tmp_path / "runs"), "--install"], compare_main=fake_compare) == 0
    for argv in seen:
        assert argv[argv.index("--protocol") + 1] == "sequential" and argv[argv.index("--batch-size") + 1] == "10"
        assert argv[argv.index("--hparams") + 1] == f"UltraEdit={batch_file}"     # no sequential file yet
    assert batch_file.read_text() == before                                      # the batch file is untouched
    installed = shipped / "smollm2-135m-sequential" / "UltraEdit.yaml"
    assert installed.is_file() and "sequential chunks of 10, no rollback" in installed.read_text()
    assert hparams_origin(installed) == "tuned by memoe-tune (4 trials, 200 zsre-knowedit dev edits, sequential)"
    assert "sequential chunks of 10, no rollback" in (tmp_path / "runs" / "tuning.md").read_text()
    # memoe-compare: the sequential protocol reads the sequential file, the batch protocol the batch file;
    # --hparams-dir and --hparams still come first.
    assert hparams_path_for("UltraEdit", None, {}, "sequential") == installed
    assert hparams_path_for("UltraEdit", None, {}, "batch") == batch_file
    assert hparams_path_for("UltraEdit", None, {"UltraEdit": tmp_path / "x.yaml"}, "sequential") == tmp_path / "x.yaml"
    assert hparams_path_for("MEMoE", None, {}, "sequential").name == "smollm2-135m-sequential.yaml"
    assert hparams_path_for("MEMoE", None, {}).name == "smollm2-135m.yaml"
    # A second sequential search starts from the installed sequential file.
    seen.clear()
    assert tune(["--methods", "UltraEdit", "--trials", "2", "--protocol", "sequential",
                 "--out", str(tmp_path / "runs2")], compare_main=fake_compare) == 0
    assert all(a[a.index("--hparams") + 1] == f"UltraEdit={installed}" for a in seen)
    # The batch protocol is unchanged: chunks of 30, rolled back.
    seen.clear()
    assert tune(["--methods", "UltraEdit", "--trials", "2", "--out", str(tmp_path / "runs3")],
                compare_main=fake_compare) == 0
    assert all(a[a.index("--protocol") + 1] == "batch" and a[a.index("--batch-size") + 1] == "30" for a in seen)
    assert "chunks of 30, rolled back" in (tmp_path / "runs3" / "tuned" / "UltraEdit.yaml").read_text()


def test_tune_stops_on_a_usage_error_instead_of_scoring_the_trial_as_failed(tmp_path):
    def refusing_compare(argv, **_):
        return 2 if "--set" in argv else 0        # trial 0 runs; the first drawn trial is refused
    with pytest.raises(CompareError, match="trial 1 .*nothing was chosen or installed"):
        tune(["--methods", "FT-L", "--trials", "3", "--out", str(tmp_path)], compare_main=refusing_compare)
    assert not (tmp_path / "tuned" / "FT-L.yaml").exists()


def gen_row(em, em_rephrase, loc, pre_em=0.0, rel=20.0, gen=20.0):
    return {**row(rel, gen, loc), "gen_em": em, "gen_em_rephrase": em_rephrase, "pre_gen_em": pre_em,
            "pre_reliability": rel}


def test_the_generation_criterion_scores_greedy_exact_match_and_its_edit_rule_uses_the_unedited_models():
    """GRACE's and DEFER's teacher-forced reliability misses their edits: by the default criterion no trial
    edits (the shipped file stays, whatever its exact match), by the generation criterion they are told apart."""
    shipped, wider = gen_row(100.0, 10.0, 100.0), gen_row(90.0, 60.0, 97.0)
    assert score(wider, GENERATION) == pytest.approx((90 + 60 + 97) / 3)
    assert not edits(shipped) and select_best([({}, shipped), ({"eps": 50}, wider)])[0] == 0
    assert edits(shipped, GENERATION) and select_best([({}, shipped), ({"eps": 50}, wider)], GENERATION)[0] == 1
    unchanged = gen_row(15.0, 15.0, 100.0, pre_em=10.0)             # exact match the unedited model already had
    assert edit_gain(unchanged, GENERATION) == pytest.approx(5.0) and not edits(unchanged, GENERATION)
    assert score(row(90, 60, 30), GENERATION) == float("-inf")     # a trial run without --generation


def test_a_generation_search_runs_its_trials_with_generation_and_says_so(tmp_path):
    seen = []

    def fake_compare(argv, **_):
        """Exact match grows with GRACE's eps; teacher-forced reliability does not move."""
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        eps = next((json.loads(argv[i + 1].split("=", 1)[1]) for i, a in enumerate(argv)
                    if a == "--set" and argv[i + 1].startswith("GRACE.eps=")), 1.0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps([gen_row(100.0, min(eps, 100.0), 100.0 - eps / 10)]))
        return 0
    assert tune(["--methods", "GRACE", "--trials", "4", "--criterion", "generation", "--out", str(tmp_path)],
                compare_main=fake_compare) == 0
    assert len(seen) == 4 and all(a.count("--generation") == 1 for a in seen)
    tuned = (tmp_path / "tuned" / "GRACE.yaml").read_text()
    assert "Criterion: mean of greedy exact match" in tuned and "(generation)" in tuned and "gen_em 100.0" in tuned
    report = (tmp_path / "tuning.md").read_text()
    assert "(generation criterion)" in report and "| EM | Gen. EM | Loc. |" in report
    best = yaml.safe_load(tuned)["eps"]
    trials = [json.loads((tmp_path / "trials" / "GRACE" / f"{i:02d}" / "trial.json").read_text()) for i in range(4)]
    assert best == max(t.get("eps", 1.0) for t in trials if t.get("eps", 1.0) <= 100)
    assert tune(["--methods", "GRACE", "--trials", "2", "--criterion", "generation", "--generation",
                 "--out", str(tmp_path)], compare_main=fake_compare) == 0
    assert seen[-1].count("--generation") == 1                        # given once, passed on once
    # Trials run without --generation cannot be chosen among by exact match: they lack its columns.
    assert tune(["--methods", "GRACE", "--trials", "2", "--out", str(tmp_path / "tf")], compare_main=fake_compare) == 0
    with pytest.raises(CompareError, match="ran without --generation"):
        tune(["--methods", "GRACE", "--trials", "2", "--criterion", "generation", "--out", str(tmp_path / "tf")],
             compare_main=fake_compare)


def test_a_finished_search_is_chosen_among_again_by_same_subject_locality_without_rerunning(tmp_path):
    """ROME's ZsRE dev search (docs/compare.md): the shipped layer-5 file wins by the default criterion, a
    layer-3 trial that spills less onto the subject's other facts by the tables' four-column average."""
    rows = {None: {**row(49.9, 36.6, 77.7), "same_subject": 44.1, "pre_reliability": 14.5},
            0.1: {**row(25.7, 20.5, 92.5), "same_subject": 80.5, "pre_reliability": 14.5}}
    runs = []

    def fake_compare(argv, **_):
        out = Path(argv[argv.index("--out") + 1])
        if "--resume" in argv:
            return 0                                                  # finished: memoe-compare skips it
        runs.append(argv)
        v_lr = next((json.loads(argv[i + 1].split("=", 1)[1]) for i, a in enumerate(argv)
                     if a == "--set" and argv[i + 1].startswith("ROME.v_lr=")), None)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")
        (out / "summary.json").write_text(json.dumps([rows[v_lr] if v_lr in rows else row(0, 0, 0)]))
        return 0
    assert tune(["--methods", "ROME", "--trials", "3", "--out", str(tmp_path)], compare_main=fake_compare) == 0
    assert len(runs) == 3 and select_best([({}, rows[None]), ({}, rows[0.1])])[0] == 0
    assert "Criterion: mean of reliability, generality and locality (teacher-forced)" in \
        (tmp_path / "tuned" / "ROME.yaml").read_text()
    assert tune(["--methods", "ROME", "--trials", "3", "--criterion", "same-subject", "--out", str(tmp_path)],
                compare_main=fake_compare) == 0
    assert len(runs) == 3                                             # nothing rerun
    assert select_best([({}, rows[None]), ({}, rows[0.1])], SAME_SUBJECT)[0] == 1
    tuned = (tmp_path / "tuned" / "ROME.yaml").read_text()
    _, winner, _ = select_best(read_trials(tmp_path / "trials" / "ROME"), SAME_SUBJECT)
    assert winner["v_lr"] == 0.1 and "(same-subject)" in tuned
    assert all(yaml.safe_load(tuned)[k] == v for k, v in winner.items())
    assert "(same-subject criterion)" in (tmp_path / "tuning.md").read_text()
    plain = tmp_path / "plain"                                       # records without same-subject prompts
    rows[None] = row(49.9, 36.6, 77.7)
    with pytest.raises(CompareError, match="same_subject needs KnowEdit records"):
        tune(["--methods", "ROME", "--trials", "1", "--criterion", "same-subject", "--out", str(plain)],
             compare_main=fake_compare)


def test_space_narrows_one_list_of_a_methods_grid_and_the_tuned_file_says_so(tmp_path):
    """WISE's n_iter 30 costs about 42 min a trial on one CPU core; --space WISE.n_iter=10 keeps every trial
    at 10 while the other lists are searched as usual."""
    seen = []

    def fake_compare(argv, **_):
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps([row(50.0 + len(seen), 20.0, 90.0)]))
        return 0
    assert tune(["--methods", "WISE", "--trials", "5", "--space", "WISE.n_iter=10", "--out", str(tmp_path)],
                compare_main=fake_compare) == 0
    trials = [json.loads((tmp_path / "trials" / "WISE" / f"{i:02d}" / "trial.json").read_text()) for i in range(5)]
    assert trials[0] == {} and all(t["n_iter"] == 10 for t in trials[1:])
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 5      # still distinct points of the grid
    space, changed = search_space("WISE", ["WISE.n_iter=10", "wise.edit_lr=[0.5]"])
    assert changed == {"n_iter": [10], "edit_lr": [0.5]} and space["act_ratio"] == SEARCH_SPACES["WISE"]["act_ratio"]
    header = (tmp_path / "tuned" / "WISE.yaml").read_text().splitlines()[0]
    assert 'with --space {"n_iter": [10]}' in header
    # Mistakes stop before trial 0 runs: a method not tuned here, a key the file lacks, an empty list, bad syntax.
    for space_arg, message in (("GRACE.eps=[1]", "does not tune"), ("WISE.n_itr=[10]", "not a setting of WISE"),
                               ("WISE.n_iter=[]", "at least one setting"), ("WISE=10", "expected METHOD.key")):
        with pytest.raises(CompareError, match=message):
            tune(["--methods", "WISE", "--trials", "2", "--space", space_arg, "--out", str(tmp_path / "bad")],
                 compare_main=fake_compare)
    assert len(seen) == 5
