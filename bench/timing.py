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
