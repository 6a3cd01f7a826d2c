"""The helpers benchmark scripts rely on."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rss_monitor_sees_the_memory_of_the_command(tmp_path):
    csv = tmp_path / "rss.csv"
    command = [sys.executable, str(REPO / "benchmarks/memory/rss_monitor.py"), "--every", "0.1", "--csv", str(csv), "--",
               sys.executable, "-c", "import time; x = bytearray(80 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
                                     "time.sleep(1.5)"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    peak = float(done.stdout.split("peak ")[1].split(" MB")[0])
    assert peak >= 80, done.stdout
    rows = csv.read_text().splitlines()
    assert rows[0] == "seconds,rss_mb" and len(rows) > 3


def test_rss_monitor_passes_the_exit_status_through():
    command = [sys.executable, str(REPO / "benchmarks/memory/rss_monitor.py"), "--every", "0.1", "--",
               sys.executable, "-c", "raise SystemExit(3)"]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 3


def test_slope_of_a_steady_leak():
    sys.path.insert(0, str(REPO / "benchmarks" / "memory"))
    from rss_monitor import slope_mb_per_hour
    samples = [(t * 60.0, int(100 * 2**20 + t * 2**20)) for t in range(30)]   # +1 MB per minute
    assert abs(slope_mb_per_hour(samples) - 60.0) < 1e-6


def test_by_edit_order_groups_final_cases_of_the_latest_attempt_in_edit_order():
    sys.path.insert(0, str(REPO / "benchmarks/quality"))
    try:
        from by_edit_order import by_order
    finally:
        sys.path.pop(0)

    def case(attempt, index, rewrite):
        return {"type": "case", "attempt": attempt, "index": index, "chunk": 1, "final": True,
                "metric": {"post": {"rewrite_acc": [rewrite], "rephrase_acc": [rewrite],
                                    "locality": {"neighborhood_acc": [1.0]}}}}
    records = [case("old", i, 0.0) for i in range(4)] + [{"type": "run_end", "attempt": "old"}]
    records += [{"type": "chunk", "attempt": "new", "chunk": 0, "range": [0, 2], "edit_seconds": 4.0},
                {"type": "chunk", "attempt": "new", "chunk": 1, "range": [2, 4], "edit_seconds": 8.0},
                case("new", 3, 1.0), case("new", 2, 1.0), case("new", 0, 0.5), case("new", 1, 0.0),
                {"type": "case", "attempt": "new", "index": 0, "final": False, "metric": {}},
                {"type": "run_end", "attempt": "new"}]
    rows = by_order(records, parts=2)
    assert [r["edits"] for r in rows] == ["0-1", "2-3"]
    assert [r["reliability"] for r in rows] == [25.0, 100.0]
    assert [r["batch_seconds"] for r in rows] == [4.0, 8.0]


def test_every_ablation_row_is_a_valid_setting_of_the_tuned_file():
    """A row that the hparams reject (an option that needs another the row switches off) would only fail
    hours into an ablation run."""
    from memoe_plugin.eval.overrides import load_hparams
    sys.path.insert(0, str(REPO / "benchmarks/quality"))
    try:
        import ablations
    finally:
        sys.path.pop(0)
    for group, rows in ablations.GROUPS.items():
        for label, change in rows:
            if isinstance(change, dict):
                load_hparams(ablations.TUNED, **change)
            else:
                assert change in ablations.FILES, (group, label)
