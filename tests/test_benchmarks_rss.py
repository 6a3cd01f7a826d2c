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
