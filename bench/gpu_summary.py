"""Assemble OUTDIR/summary.md from what `bench/gpu_check.sh` left in OUTDIR: the machine's facts, the
commit, each stage's status, the gpu test counts, and the ladder and kernel tables ready for the README.
Reads partial results too (a stage cut at its limit keeps the rows it measured).

    python bench/gpu_summary.py OUTDIR
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LADDER_STAGES = ("ladder-batch1", "ladder-batch8", "ladder-compile", "ladder-eager-fp32")
PIXART_STAGES = ("ladder-pixart-sigma-1024",)
KERNEL_STAGES = ("bench-attention", "bench-adaln", "bench-scheduler-step", "bench-mlp-epilogue")
NCCL_STAGES = ("parallel-nccl-world1",)  # bench/gpu_check.sh --parallel: its runs in single/ and nccl/


def newest_json(folder: Path) -> dict | None:
    """The final report, else the partial one a cut-off run left behind."""
    files = sorted(folder.glob("*.json"), key=lambda p: ("partial" in p.name, p.stat().st_mtime))
    return json.loads(files[0].read_text()) if files else None


def ladder_table(reports: list[dict]) -> list[str]:
    lines = ["| variant | batch | dtype | ms/step | p20 | p80 | img/s | peak MB | setup s | TFLOP/s | % H100 floor "
             "| SQNR dB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for report in reports:
        for r in report["results"]:
            mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['dtype']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} "
                         f"| {r['p80_ms']:.3f} | {r['images_per_s']:.1f} | {mem} | {r['setup_s']:.1f} | "
                         f"{r['tflops']:.1f} | {r['pct_of_h100_floor']:.1f} | "
                         f"{'-' if r['sqnr_db'] is None else format(r['sqnr_db'], '.1f')} |")
    return lines


def nccl_section(folder: Path) -> list[str]:
    """The --parallel plan's stage: nccl_check's verdict line and the two ladder runs' rows (one process, a
    one-rank torchrun), read from the runs' own reports so that a stage cut before the check still shows them."""
    check = folder / "nccl-check.md"
    lines = ["", f"## {folder.name}: sequence parallelism's NCCL path at world size 1", "",
             check.read_text().strip() if check.exists() else "nccl_check did not run (cut off, or a run failed)",
             "", "| run | variant | batch | dtype | ms/step | p20 | p80 | setup s | max err | SQNR dB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run, label in (("single", "one process"), ("nccl", "torchrun, 1 rank, --ulysses-degree 1")):
        report = newest_json(folder / run) if (folder / run).is_dir() else None
        for r in report["results"] if report else []:
            err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
            sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
            lines.append(f"| {label} | {r['variant']} | {r['batch']} | {r['dtype']} | {r['median_ms']:.3f} | "
                         f"{r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {r['setup_s']:.1f} | {err} | {sqnr} |")
    return lines


def summarize(out: Path) -> str:
    facts = json.loads((out / "cuda.json").read_text()) if (out / "cuda.json").exists() else {}
    commit = (out / "commit.txt").read_text().strip() if (out / "commit.txt").exists() else "unknown"
    lines = ["# GPU check", "",
             f"- device: {facts.get('device', 'unknown')} (compute capability {facts.get('capability', '?')})",
             f"- nvidia-smi (name, driver, memory): {facts.get('nvidia_smi', 'unknown')}",
             f"- torch {facts.get('torch', '?')}, CUDA {facts.get('cuda_build', '?')}, "
             f"triton {facts.get('triton', '?')}, "
             f"Python {facts.get('python', '?')}",
             f"- commit {commit}", "", "## Stages", "", "| stage | limit s | took s | status |", "|---|---:|---:|---|"]
    stages = out / "stages.tsv"
    for row in stages.read_text().splitlines() if stages.exists() else []:
        lines.append("| " + " | ".join(row.split("\t")) + " |")
    tests = out / "gpu-tests.log"
    if tests.exists():
        counts = [line for line in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        failures = [line for line in tests.read_text().splitlines() if line.startswith(("FAILED", "ERROR"))]
        lines += ["", "## gpu tests", "", (counts[-1].strip("= ") if counts else "no result line (cut off?)")]
        lines += [f"- {line}" for line in failures]
    for title, stages in (("DiT-XL/2 ladder", LADDER_STAGES), ("PixArt-Σ 1024 px ladder", PIXART_STAGES)):
        reports = [r for r in (newest_json(out / name) for name in stages if (out / name).is_dir()) if r]
        if reports:
            first = reports[0]
            latent = first.get("latent") or first["config"].get("input_size")
            lines += ["", f"## {title} ({first['model']}, latent {latent}, {first['scheduler']}; "
                          f"{first['env']['device']})", "", *ladder_table(reports)]
    for name in NCCL_STAGES:
        if (out / name).is_dir():
            lines += nccl_section(out / name)
    for name in KERNEL_STAGES:
        log = out / f"{name}.log"
        table = [line for line in log.read_text().splitlines() if line.startswith("|")] if log.exists() else []
        if table:
            lines += ["", f"## {name}", "", *table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/gpu_summary.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    (out / "summary.md").write_text(summarize(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
