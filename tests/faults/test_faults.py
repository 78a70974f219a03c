"""The fault-injection harness as a pytest entry: every fault of tests/faults/faults.py must be caught by its tests.

Slow (about 8 minutes on a 2-core machine, plus 5-7 minutes for the first clean native build of the scratch
copy), so it is marked `slow` and left out of the default run; run it with

    python -m pytest -m slow tests/faults/test_faults.py

or directly, with per-fault output as it goes: `python tests/faults/run.py` (see tests/faults/README.md).
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("run.py")


def test_every_fault_is_caught(tmp_path):
    report = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(RUNNER), "--json", str(report)], capture_output=True, text=True,
                          timeout=4 * 3600)
    assert proc.returncode == 0, f"faults not caught (exit {proc.returncode}):\n{proc.stdout[-12000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
