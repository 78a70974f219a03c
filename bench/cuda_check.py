"""The GPU run's first stage: prove that torch sees a CUDA device and that Triton compiles and runs a
kernel on it, in seconds and before anything is installed (it imports torch and triton, not ditengine).

    python bench/cuda_check.py OUT.json

Writes the machine's facts (device, driver, torch, triton, CUDA) to OUT.json and exits 0; otherwise
prints one line naming what is wrong with CUDA and exits 1.
"""
from __future__ import annotations

import json
import subprocess
import sys


def facts() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda or "none", "python": sys.version.split()[0]}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as err:  # a broken Triton install raises more than ImportError
        info["triton"] = f"not importable ({type(err).__name__}: {err})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable ({err})"
    return info


def check(info: dict) -> str | None:
    """None when CUDA and Triton work; else the one-line reason."""
    import torch

    if not torch.cuda.is_available():
        return (f"CUDA is not available to torch {info['torch']} (CUDA build {info['cuda_build']}; nvidia-smi: "
                f"{info['nvidia_smi'] or 'no output'}): no GPU, or a driver that does not match the CUDA build")
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

        x = torch.arange(1000, device="cuda", dtype=torch.float32)
        add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
        torch.cuda.synchronize()
        if not torch.equal(x.cpu(), torch.arange(1000, dtype=torch.float32) + 1):
            return "Triton ran a kernel on CUDA but its result is wrong"
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"Triton cannot compile or run a kernel on CUDA ({type(err).__name__}: {first})"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = facts()
    reason = check(info)
    info["ok"] = reason is None
    if argv:
        with open(argv[0], "w") as f:
            json.dump(info, f, indent=2)
    if reason:
        print(f"cuda-check failed: {reason}", file=sys.stderr)
        return 1
    print(f"cuda-check: {info['device']} (sm_{info['capability'].replace('.', '')}), torch {info['torch']}, "
          f"CUDA {info['cuda_build']}, triton {info['triton']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
