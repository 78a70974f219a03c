"""The GPU run's script, checked without a GPU: its plan fits one device command, it fails fast where CUDA
is missing, and its summary is built from what the stages leave behind (partial results included)."""
import json
import os
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


def test_the_parallel_plan_is_a_call_of_its_own():
    parallel = plan("--parallel")
    assert sum(parallel.values()) <= 540 and list(parallel) == ["cuda-check", "install", "parallel-nccl-world1"]
    assert "parallel-nccl-world1" not in plan() and "parallel-nccl-world1" not in plan("--quick")


def torchrun(*argv, cwd):
    """`argv` on a one-rank torchrun group (gloo here: no CUDA), one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *argv],
                          capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def ladder_report(folder: Path, ms: float) -> None:
    """A ladder report as `python -m ditengine.bench` writes it, its fused+graph-loop row at `ms` ms/step."""
    folder.mkdir()
    row = dict(variant="fused+graph-loop", batch=1, dtype="bfloat16", median_ms=ms, p20_ms=ms, p80_ms=ms, setup_s=1.0,
               new_shape_s=1.0, max_err=0.01, sqnr_db=40.0)
    (folder / "bench-20260101-000000.json").write_text(json.dumps(
        {"model": "DiT-XL/2", "env": {"device": "Test GPU"}, "parallel": None, "results": [row]}))


def test_nccl_check_runs_the_sequence_path_on_one_gloo_rank_and_matches_one_process(tmp_path):
    """nccl_check's comparison on a CPU (gloo, world size 1, eager): the tiny DiT with ParallelConfig() equals it
    without; and its ms/step of the two ladder runs."""
    ladder_report(tmp_path / "single", 10.0)
    ladder_report(tmp_path / "nccl", 11.0)
    done = torchrun("-m", "ditengine.bench.nccl_check", str(tmp_path), "--single", str(tmp_path / "single"),
                    "--nccl", str(tmp_path / "nccl"), "--device", "cpu", cwd=tmp_path)
    assert (tmp_path / "nccl-check.json").exists(), done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "nccl-check.json").read_text())
    line = (tmp_path / "nccl-check.md").read_text()
    assert result["backend"] == "gloo" and result["world_size"] == 1
    assert result["ratio"] == pytest.approx(1.1) and "10.000 ms/step in one process, 11.000" in line
    c = result["comparison"]
    assert "error" not in c, c
    assert c["agree"] and (c["bitwise"] or c["max_rel_err"] <= 1e-5), c
    assert c["sequence_group"] == 1 and not result["problems"], result  # the sharded path ran, not the plain one
    for kind in ("alltoall", "allgather"):  # around each self-attention; the final norm's output
        assert any(kind in op for op in c["collectives"]), c["collectives"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert line.rstrip().endswith("proven")


def test_summary_shows_the_parallel_stage_from_its_two_ladder_runs(tmp_path):
    """The stage's layout, on a CPU: the ladder's row in one process and under a one-rank torchrun with
    --ulysses-degree 1 (the layout asked for at degree 1), and nccl_check's line, in summary.md."""
    from ditengine.bench.cli import main as ladder

    stage = tmp_path / "parallel-nccl-world1"
    row = ["-m", "ditengine.bench", "--model", "DiT-S/2", "--depth", "1", "--input-size", "8", "--steps", "2",
           "--repeats", "2", "--warmup", "1", "--dtype", "fp32", "--variants", "fused+graph-loop"]
    ladder([*row[2:], "--out", str(stage / "single")])
    done = torchrun(*row, "--ulysses-degree", "1", "--out", str(stage / "nccl"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "over ranks: one rank, every degree 1" in done.stdout
    (report,) = (stage / "nccl").glob("bench-*.json")
    assert json.loads(report.read_text())["parallel"] == {"ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1}
    (stage / "nccl-check.md").write_text("gloo at world size 1: a verdict line. proven\n")
    (tmp_path / "stages.tsv").write_text("parallel-nccl-world1\t120\t40\tok\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_summary.py"), str(tmp_path)], check=True, timeout=60)
    summary = (tmp_path / "summary.md").read_text()
    assert "## parallel-nccl-world1: sequence parallelism's NCCL path at world size 1" in summary
    assert "gloo at world size 1: a verdict line. proven" in summary
    assert "| one process | fused+graph-loop | 1 | float32 |" in summary
    assert "| torchrun, 1 rank, --ulysses-degree 1 | fused+graph-loop | 1 | float32 |" in summary
