"""memoe-compare, report.py: the summary tables (seeds' spread, unscored portability)."""
from __future__ import annotations

import json

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from memoe_plugin.eval.compare import summarise
from compare_fakes import FakeBackend, run_main


def test_seeds_draw_their_own_records_and_the_summary_gives_the_spread(tmp_path):
    backend = FakeBackend(damage_after=100)
    assert run_main(tmp_path, backend, "--methods", "MEMoE", "--num-edits", "6", "--batch-size", "3",
                    "--seeds", "0,1,2", "--split", "test") == 0
    calls = [prompts for _, prompts in backend.calls]                # two chunks of 3 per seed
    samples = [tuple(calls[i] + calls[i + 1]) for i in range(0, len(calls), 2)]
    assert len(samples) == 3 and len(set(samples)) == 3            # each seed its own records
    from memoe_plugin.eval.splits import split_of
    assert all(split_of({"prompt": p}) == "test" for s in samples for p in s)
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(r["seed"] for r in rows) == [0, 1, 2] and {r["split"] for r in rows} == {"test"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "test split, seeds 0, 1, 2" in summary and "100.0 ± 0.0" in summary
    assert run_main(tmp_path, FakeBackend(), "--seeds", "1,x") == 2


def test_the_summary_counts_the_edits_whose_portability_went_unscored():
    run = "zsre|sequential|bs=10|n=2|GRACE"
    post = {"rewrite_acc": [1.0], "rephrase_acc": [1.0], "locality": {}, "portability": {}}
    records = [{"type": "run_start", "run": run, "attempt": "a"},
               {"type": "chunk", "run": run, "attempt": "a", "chunk": 0, "range": [0, 2], "edit_seconds": 1.0},
               *[{"type": "case", "run": run, "attempt": "a", "chunk": 0, "step": 0, "index": i, "final": True,
                  "metric": {"pre": {}, "post": dict(post, **({"portability_unscored": "why"} if i else {}))}}
                 for i in range(2)],
               {"type": "run_end", "run": run, "attempt": "a", "status": "complete"}]
    rows = summarise(records)
    assert rows[0]["portability_unscored"] == 1
    from memoe_plugin.eval.compare.report import markdown_summary
    assert "portability of 1 edits unscored" in markdown_summary(rows)


def test_portability_is_reported_by_part_over_the_edits_that_have_each_part():
    run = "counterfact-knowedit|batch|bs=2|n=2|MEMoE"
    parts = [{"Subject_Aliasing_acc": [1.0], "Reasoning_acc": [0.0, 0.5]}, {"Subject_Aliasing_acc": [0.0]}]
    records = [{"type": "run_start", "run": run, "attempt": "a"},
               {"type": "chunk", "run": run, "attempt": "a", "chunk": 0, "range": [0, 2], "edit_seconds": 1.0},
               *[{"type": "case", "run": run, "attempt": "a", "chunk": 0, "step": 0, "index": i, "final": True,
                  "metric": {"pre": {}, "post": {"rewrite_acc": [1.0], "locality": {}, "portability": part}}}
                 for i, part in enumerate(parts)],
               {"type": "run_end", "run": run, "attempt": "a", "status": "complete"}]
    row = summarise(records)[0]
    assert row["portability_aliases"] == 50.0 and row["portability_reasoning"] == 25.0
    assert row["portability_logical"] is None
    assert row["portability"] == 100 * (0.625 + 0.0) / 2     # EasyEdit's mean over an edit's kinds, then over edits
    from memoe_plugin.eval.compare.report import markdown_summary
    table = markdown_summary([row])
    assert "Port. alias" in table and "Port. reason" in table and "Port. logic" not in table
