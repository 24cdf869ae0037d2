"""The suite's CPU-time report (tests/fixtures/cpu_time.py): a test that burns CPU is measured as
busy at least that long (other processes can only add to the machine's busy time, so the bound
holds on a loaded machine), and the report is ranked by CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from avts_dist.config import REPO_ROOT
from tests.fixtures.cpu_time import busy_cpu_seconds

pytestmark = pytest.mark.skipif(busy_cpu_seconds() is None, reason="no /proc/stat here")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_busy_cpu_seconds_counts_a_busy_loop():
    before = busy_cpu_seconds()
    _burn(0.5)
    after = busy_cpu_seconds()
    # Other processes can only add to the machine's busy time; the clock ticks 100 times a second.
    assert after - before >= 0.4


def test_the_report_measures_each_test_and_ranks_by_cpu(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "import time\n"
        "def test_sleeps():\n    time.sleep(1.0)\n"
        "def test_burns():\n"
        "    end = time.process_time() + 1.0\n"
        "    while time.process_time() < end:\n        pass\n"
    )
    out = tmp_path / "cpu.json"
    env = {**os.environ, "AVTS_TEST_CPU_JSON": str(out), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "tests.fixtures.cpu_time", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "most CPU: the 15 tests that kept the machine busiest" in proc.stdout
    doc = json.loads(out.read_text())
    rows = {r["test"].split("::")[1]: r for r in doc["tests"]}
    cpu = [r["cpu_s"] for r in doc["tests"]]
    assert cpu == sorted(cpu, reverse=True) and len(cpu) == 2
    assert rows["test_burns"]["cpu_s"] >= 0.9 and rows["test_sleeps"]["wall_s"] >= 1.0
    assert doc["busy_cpu_s"] >= rows["test_burns"]["cpu_s"] and doc["cores"] >= 1
