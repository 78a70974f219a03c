"""The GPU run's script, checked without a GPU: its plan fits one device command, it fails fast where CUDA
is missing, and its summary is built from what the stages leave behind (partial results included)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def plan(*flags):
    done = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    *stages, total = done.stdout.strip().splitlines()
    limits = {line.split()[0]: int(line.split()[1]) for line in stages}
    assert total == f"total {sum(limits.values())} s"
    return limits


def test_plan_fits_one_device_command_in_order_of_value():
    full = plan()
    assert sum(full.values()) <= 540
    order = list(full)
    assert order[:4] == ["cuda-check", "install", "gpu-tests", "ladder-batch1"]
    assert order.index("ladder-batch8") < order.index("ladder-compile") < order.index("bench-attention")
    quick = plan("--quick")
    assert sum(quick.values()) <= 240 and list(quick)[:3] == ["cuda-check", "install", "gpu-tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_fails_fast_without_cuda_before_installing_anything(tmp_path):
    start = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr
    assert not (tmp_path / "install.log").exists() and not (tmp_path / "summary.md").exists()
    assert json.loads((tmp_path / "cuda.json").read_text())["ok"] is False
    assert time.monotonic() - start < 90


def test_summary_reads_partial_ladder_results_and_kernel_tables(tmp_path):
    from ditengine.bench.cli import main as ladder

    ladder(["--model", "DiT-S/2", "--depth", "1", "--input-size", "8", "--steps", "2", "--repeats", "2",
            "--warmup", "1", "--variants", "eager-lp-sdpa,fused", "--out", str(tmp_path / "ladder-batch1")])
    final = next((tmp_path / "ladder-batch1").glob("bench-*.json"))
    final.rename(final.with_name("bench-partial-1.json"))  # as a run cut at its limit leaves it
    (tmp_path / "cuda.json").write_text(json.dumps({"device": "Test GPU", "capability": "9.0", "torch": "2.x",
                                                     "cuda_build": "13.0", "triton": "3.6.0", "nvidia_smi": "x"}))
    (tmp_path / "stages.tsv").write_text("cuda-check\t20\t2\tok\nladder-batch1\t60\t60\tcut at 60 s\n")
    (tmp_path / "gpu-tests.log").write_text("FAILED tests/test_x.py::test_y - boom\n"
                                            "==== 1 failed, 80 passed in 9s ====\n")
    (tmp_path / "bench-adaln.log").write_text("adaln | Test GPU\n\n| shape | dtype |\n|---|---|\n| B=2 | bf16 |\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_summary.py"), str(tmp_path)], check=True, timeout=60)
    summary = (tmp_path / "summary.md").read_text()
    assert "device: Test GPU" in summary and "triton 3.6.0" in summary
    assert "| ladder-batch1 | 60 | 60 | cut at 60 s |" in summary
    assert "1 failed, 80 passed" in summary and "- FAILED tests/test_x.py::test_y" in summary
    assert "| eager-lp-sdpa | 1 |" in summary and "| fused | 1 |" in summary
    assert "## bench-adaln" in summary and "| B=2 | bf16 |" in summary


def test_the_wan_plan_is_a_call_of_its_own():
    wan = plan("--wan")
    assert sum(wan.values()) <= 540 and list(wan)[:2] == ["cuda-check", "install"]
    assert "ladder-wan-1.3b-480p" in wan and "ladder-wan-1.3b-480p" not in plan()


def test_the_flux_plan_is_a_second_call_of_its_own():
    flux = plan("--flux")
    assert sum(flux.values()) <= 540 and list(flux)[:2] == ["cuda-check", "install"]
    assert "ladder-flux-dev-1024" in flux and "ladder-flux-dev-1024" not in plan()
