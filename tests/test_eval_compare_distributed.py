"""memoe-compare --ray: units of work as Ray tasks on a local cluster give the same results as one process."""
import json
import sys

import pytest

from compare_fakes import FakeBackend, data_folder, run_main  # noqa: F401 (data_folder: autouse fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed (the [distributed] extra)")


@pytest.fixture(scope="module")
def local_ray():
    import ray.cloudpickle
    for name in ("compare_fakes", __name__):          # the fakes travel by value to the workers
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def cases_by_run(out):
    """Per run key: each edit's final metric, by record id (attempt ids and times left out)."""
    found = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "case" and rec.get("final"):
            found.setdefault(rec["run"], {})[rec["record_id"]] = rec["metric"]
    return found


def summary_rows(out):
    rows = json.loads((out / "summary.json").read_text())
    volatile = ("edit_seconds", "seconds_per_edit", "edit_seconds_sd", "seconds_per_edit_sd")
    return sorted(({k: v for k, v in r.items() if k not in volatile} for r in rows),
                  key=lambda r: (r["method"], r["protocol"]))


ARGS = ("--methods", "MEMoE,GRACE", "--num-edits", "9", "--batch-size", "3", "--generation")


@pytest.mark.parametrize("protocol", ["batch", "sequential"])
def test_a_comparison_on_ray_equals_the_one_process_run(tmp_path, local_ray, protocol):
    assert run_main(tmp_path / "one", FakeBackend(), *ARGS, "--protocol", protocol) == 0
    assert run_main(tmp_path / "ray", FakeBackend(), *ARGS, "--protocol", protocol, "--ray") == 0
    one, distributed = tmp_path / "one" / "out", tmp_path / "ray" / "out"
    assert cases_by_run(distributed) == cases_by_run(one)
    assert summary_rows(distributed) == summary_rows(one)
    assert all(r["status"] == "complete" for r in summary_rows(distributed))
    if protocol == "batch":     # each rolled-back chunk was its own task
        starts = [json.loads(line) for line in (distributed / "results.jsonl").read_text().splitlines()]
        assert sum(r["type"] == "run_start" for r in starts) == 2 * 3


def test_resume_works_across_the_two_modes_and_a_failing_unit_does_not_stop_the_others(tmp_path, local_ray):
    # interrupted in one process after the first chunk ...
    assert run_main(tmp_path, FakeBackend(interrupt_at=2), *ARGS) == 130
    # ... the rest on Ray; GRACE fails on every edit, MEMoE completes
    assert run_main(tmp_path, FakeBackend(fail_methods=("GRACE",), fail_at=1), *ARGS, "--ray", "--resume") == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["MEMoE"]["status"] == "complete" and rows["MEMoE"]["cases"] == 9
    assert rows["GRACE"]["status"] == "error"
    # and back in one process: nothing left for MEMoE, GRACE tried again
    backend = FakeBackend()
    assert run_main(tmp_path, backend, *ARGS, "--resume") == 0
    assert {call[0] for call in backend.calls} == {"GRACE"}
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["GRACE"]["status"] == "complete" and rows["GRACE"]["cases"] == 9
