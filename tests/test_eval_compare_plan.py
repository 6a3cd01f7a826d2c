"""memoe-compare, plan.py: the chunks a run's edits are cut into."""
from __future__ import annotations

import pytest

from memoe_plugin.eval.compare import CompareError, chunk_ranges
from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)


def test_chunk_ranges():
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges(30, 30) == [(0, 30)]
    assert chunk_ranges(2, 10) == [(0, 2)]
    with pytest.raises(CompareError):
        chunk_ranges(3, 0)
