"""memoe-compare, store.py: results.jsonl after a crash (a torn last line, an unfinished chunk)."""
from __future__ import annotations

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from memoe_plugin.eval.compare import ResultStore, RunSpec, Runner, summarise
from compare_fakes import FakeBackend


def test_cases_of_an_unfinished_chunk_and_a_torn_line_are_ignored(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    runner = Runner(FakeBackend(), store, progress=False)
    run = RunSpec("zsre", "FT-L", "batch", 2, 4)
    runner.run_one(run)
    records = store.records()
    last_chunk = max(i for i, r in enumerate(records) if r["type"] == "chunk")
    lines = store.path.read_text().splitlines()
    # keep chunk 0 and the cases of chunk 1, drop chunk 1's record, and tear the last line (a crash mid-write)
    store.path.write_text("\n".join(lines[:last_chunk] + ['{"type": "case", "run": "zsre']) + "\n")
    assert summarise(store.records())[0]["cases"] == 2
    backend = FakeBackend()
    Runner(backend, store, resume=True, progress=False).run_one(run)
    assert [p for _, p in backend.calls] == [["Subject2 lives in", "Subject3 lives in"]]
    row = summarise(store.records())[0]
    assert row["status"] == "complete" and row["cases"] == 4
