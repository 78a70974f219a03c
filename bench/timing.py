"""Timing and provenance helpers shared by the benchmarks."""
from __future__ import annotations

import itertools
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


def measure_interleaved(providers: dict, warmup: int = 10, rounds: int = 60, inner: int = 5,
                        clock=time.perf_counter) -> dict:
    """CPU timing of several providers of one case, round-robin: each round times `inner` back-to-back calls
    of every provider, so load from other processes on a shared machine falls on all of them alike. Returns
    {provider: {"median_ms", "p20_ms", "p80_ms", "runs"}} over the rounds (per-call times). `clock` may be
    time.process_time: CPU time of this process, which time slices lost to other processes do not inflate
    (exact with one thread; with several it also counts threads spinning at barriers)."""
    if not providers:
        return {}
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - t0) * 1e3 / inner)
    result = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        result[name] = {"median_ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3], "runs": len(ts) * inner}
    return result


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


def bench_kernel(fn, device: torch.device) -> dict:
    """Median and p20/p80 ms of a kernel-sized call on CUDA: triton's do_bench (flushes L2 between runs).
    CPU timings go through `measure_interleaved`."""
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, clock=time.perf_counter) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), the memory-bound ceiling (on CPU:
    64 MiB, past the caches, timed with `clock`)."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = bench_kernel(lambda: dst.copy_(src), device)["median_ms"]
    else:
        ms = measure_interleaved({"copy": lambda: dst.copy_(src)}, warmup=2, rounds=15, inner=1,
                                 clock=clock)["copy"]["median_ms"]
    return 2 * nbytes / ms / 1e6


def format_kernel_row(r: dict, metric: str, baseline: str | None, flops_scale: float = 1.0) -> str:
    if "error" in r:
        return (f"| {r['shape']} | {r['dtype']} | {r['provider']} | unsupported: {r['error']} | | | | |"
                + (" | |" if metric == "bandwidth" else ""))
    head = (f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['median_ms']:.4f} | {r['p20_ms']:.4f} | "
            f"{r['p80_ms']:.4f}")
    if metric == "bandwidth":
        ratios = " | ".join(f"{r[k]:.2f}x" if k in r else "" for k in ("vs_eager", "vs_torch.compile"))
        return f"{head} | {r['gb_per_s']:.0f} | {r['pct_of_copy']:.0f}% | {ratios} |"
    ratio = r.get(f"vs_best_{baseline}")
    return f"{head} | {flops_scale * r['tflops']:.1f} | {f'{ratio:.2f}x' if ratio else ''} |"


def run_kernel_bench(name: str, cases, argv=None, metric: str = "bandwidth", baseline: str | None = None,
                     cpu_note: str | None = None, cpu_repeats: int | None = None) -> int:
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
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every provider (torch.set_num_threads); default: torch's")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first two cases only, few timed rounds (what the tests use)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="CPU runs: wall time, or this process's CPU time (robust on a shared machine; "
                             "use with --threads 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = device.type != "cuda"
    if cpu:
        print(f"{name}: CPU run; providers of a case are timed round-robin (warm-up, then the median over "
              f"rounds), so that other load on the machine falls on all of them alike; {args.clock} clock.")
        if cpu_note:
            print(cpu_note)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peak = copy_bandwidth(device, clock=clock) if metric == "bandwidth" else None
    env = environment(device)
    env["threads"] = torch.get_num_threads()
    env["clock"] = args.clock
    print(f"{name} | {env['device']} | torch {env['torch']}, triton {env['triton']} | {env['threads']} threads"
          + (f" | copy bandwidth {peak:.0f} GB/s" if peak else "") + "\n")
    if metric == "bandwidth":
        print("| shape | dtype | provider | ms (median) | p20 | p80 | GB/s | % of copy | vs eager | vs compile |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print(f"| shape | dtype | provider | ms (median) | p20 | p80 | {'GFLOP/s' if cpu else 'TFLOP/s'} | "
              f"vs best {baseline} |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = []
    for label, dtype, work, providers in itertools.islice(cases(device), 2 if args.quick else None):
        group = []
        for provider, fn in providers.items():
            row = {"op": name, "shape": label, "dtype": str(dtype).removeprefix("torch."), "provider": provider}
            try:
                if cpu:
                    fn()  # a first call (and compile) here; timed below, round-robin with the other providers
                else:
                    row.update(bench_kernel(fn, device))
            except Exception as err:  # e.g. an SDPA backend that does not take this head dim
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            group.append(row)
        if cpu:
            timings = measure_interleaved({r["provider"]: providers[r["provider"]] for r in group if "error" not in r},
                                          clock=clock, **(dict(warmup=1, rounds=3, inner=1) if args.quick else
                                                          dict(rounds=cpu_repeats) if cpu_repeats else {}))
            for r in group:
                r.update(timings.get(r["provider"], {}))
        for row in group:
            if "error" in row:
                continue
            if metric == "bandwidth":
                row["gb_per_s"] = work / row["median_ms"] / 1e6
                row["pct_of_copy"] = 100 * row["gb_per_s"] / peak
            else:
                row["tflops"] = work / row["median_ms"] / 1e9
        for ref in ("eager", "torch.compile"):
            ref_ms = next((r["median_ms"] for r in group if r["provider"] == ref and "median_ms" in r), None)
            for r in group:
                if ref_ms and "median_ms" in r:
                    r[f"vs_{ref}"] = ref_ms / r["median_ms"]  # speed-up over that provider (> 1: faster)
        if baseline:
            best = max((r["tflops"] for r in group if r["provider"].startswith(baseline) and "tflops" in r), default=0)
            for r in group:
                if "tflops" in r and best:
                    r[f"vs_best_{baseline}"] = r["tflops"] / best
        for r in group:  # printed and saved case by case: a run cut short keeps what it measured
            print(format_kernel_row(r, metric, baseline, 1e3 if cpu else 1.0), flush=True)
        rows.extend(group)
        path.write_text(json.dumps({"env": env, "copy_gb_per_s": peak, "results": rows}, indent=2))
    print(f"\nresults: {path}")
    return 0
