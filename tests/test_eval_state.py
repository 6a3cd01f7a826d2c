"""memoe_plugin.eval.state: the state_dict fingerprint memoe-compare checks every rollback with."""
from __future__ import annotations

import torch

from compare_fakes import data_folder  # noqa: F401 (fixture, autouse)
from memoe_plugin.eval.state import state_fingerprint
from compare_fakes import FakeModel


def test_state_fingerprint_sees_one_ulp_and_new_modules():
    model = FakeModel()
    before = state_fingerprint(model)
    with torch.no_grad():
        model.w[3] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert state_fingerprint(model) != before
    with torch.no_grad():
        model.w.zero_()
    assert state_fingerprint(model) == before
    model.extra = torch.nn.Linear(1, 1)
    assert state_fingerprint(model) != before
