"""Timing and provenance helpers shared by the benchmarks."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> dict:
    """Median and spread of `fn()` in milliseconds after `warmup` calls.

    On CUDA each call is bracketed by events (device time, no host overhead between calls hidden);
    on the CPU by perf_counter.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "runs": len(times)}


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    from ditengine.info import collect
    info = collect()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["device"]
    info["commit"] = commit()
    info["host"] = platform.node()
    return info


def bench_kernel(fn, device: torch.device, cpu_repeats: int = 5) -> dict:
    """Median and p20/p80 ms of a kernel-sized call: triton's do_bench on CUDA (flushes L2 between runs),
    the generic `measure` elsewhere (`cpu_repeats` timed calls after two warm-up calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    timing = measure(fn, device, warmup=2 if cpu_repeats > 5 else 1, repeats=cpu_repeats)
    timing.pop("runs")
    return timing


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), the memory-bound ceiling."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench_kernel(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * nbytes / ms / 1e6


def run_kernel_bench(name: str, cases, argv=None, metric: str = "bandwidth", baseline: str | None = None,
                     cpu_note: str | None = None, cpu_repeats: int = 5) -> int:
    """Shared driver of the per-op microbenchmarks.

    `cases(device)` yields (shape label, dtype, work, {provider: fn}), where work is bytes moved
    (metric "bandwidth": GB/s and % of the measured copy bandwidth) or FLOPs (metric "flops": TFLOP/s,
    and the ratio to the best provider whose name starts with `baseline`). Every provider of a case is
    timed in the same process; a provider that raises (unsupported shape or backend) is reported as such.
    Prints a markdown table and writes JSON. On a CPU, FLOP rates print as GFLOP/s; `cpu_note` replaces the
    default remark that CPU timings say nothing about the kernels (true where a case times native kernels).
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog=f"python -m ditengine.bench.{name}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-out", help="directory for the JSON results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        print(cpu_note or f"{name}: no GPU here; GPU figures need a GPU. CPU timings below run small shapes "
              "through the PyTorch reference and say nothing about the kernels' speed.")
    peak = copy_bandwidth(device) if metric == "bandwidth" else None
    rows = []
    for label, dtype, work, providers in cases(device):
        group = []
        for provider, fn in providers.items():
            row = {"op": name, "shape": label, "dtype": str(dtype).removeprefix("torch."), "provider": provider}
            try:
                row.update(bench_kernel(fn, device, cpu_repeats))
            except Exception as err:  # e.g. an SDPA backend that does not take this head dim
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                group.append(row)
                continue
            if metric == "bandwidth":
                row["gb_per_s"] = work / row["median_ms"] / 1e6
                row["pct_of_copy"] = 100 * row["gb_per_s"] / peak
            else:
                row["tflops"] = work / row["median_ms"] / 1e9
            group.append(row)
        if baseline:
            best = max((r["tflops"] for r in group if r["provider"].startswith(baseline) and "tflops" in r), default=0)
            for r in group:
                if "tflops" in r and best:
                    r[f"vs_best_{baseline}"] = r["tflops"] / best
        rows.extend(group)
    env = environment(device)
    print(f"{name} | {env['device']} | torch {env['torch']}, triton {env['triton']}"
          + (f" | copy bandwidth {peak:.0f} GB/s" if peak else "") + "\n")
    if metric == "bandwidth":
        print("| shape | dtype | provider | ms (median) | p20 | p80 | GB/s | % of copy |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
    else:
        rate = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
        print(f"| shape | dtype | provider | ms (median) | p20 | p80 | {rate} | vs best {baseline} |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | unsupported: {r['error']} | | | | |")
        elif metric == "bandwidth":
            print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['median_ms']:.4f} | {r['p20_ms']:.4f} | "
                  f"{r['p80_ms']:.4f} | {r['gb_per_s']:.0f} | {r['pct_of_copy']:.0f}% |")
        else:
            ratio = r.get(f"vs_best_{baseline}")
            value = r["tflops"] if device.type == "cuda" else 1e3 * r["tflops"]
            print(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['median_ms']:.4f} | {r['p20_ms']:.4f} | "
                  f"{r['p80_ms']:.4f} | {value:.1f} | {f'{ratio:.2f}x' if ratio else ''} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"env": env, "copy_gb_per_s": peak, "results": rows}, indent=2))
    print(f"\nresults: {path}")
    return 0
