"""memoe-compare, cli.py: the command's usage errors and --summarize-only."""
from __future__ import annotations

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from compare_fakes import FakeBackend, run_main


def test_usage_errors(tmp_path, capsys):
    assert run_main(tmp_path, FakeBackend(), "--methods", "FT-Q") == 2
    assert "unknown method" in capsys.readouterr().err
    assert run_main(tmp_path, FakeBackend(), "--data", "zsre,counterfact", "--data-file", "x.json") == 2
    assert run_main(tmp_path, FakeBackend(), "--data", "wiki") == 2


def test_summarize_only_and_two_datasets_in_one_table(tmp_path):
    backend = FakeBackend()
    assert run_main(tmp_path, backend, "--data", "zsre,counterfact", "--methods", "MEMoE,GRACE",
                    "--num-edits", "2", "--batch-size", "2") == 0
    (tmp_path / "out" / "summary.md").unlink()
    assert run_main(tmp_path, FakeBackend(), "--summarize-only") == 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "zsre Rel." in markdown and "counterfact Rel." in markdown
    with (tmp_path / "out" / "summary.csv").open() as handle:
        assert len(handle.read().strip().splitlines()) == 1 + 4
