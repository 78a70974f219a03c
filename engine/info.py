"""`ditengine-info`: versions, device, and which backends are live."""
from __future__ import annotations

import platform

import torch


def collect() -> dict:
    from ditengine import __version__
    from ditengine.kernels import _native, triton_available, triton_mode

    info = {
        "ditengine": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "triton": "none",
        "triton_mode": triton_mode(),
    }
    if triton_available():
        import triton
        info["triton"] = triton.__version__
    try:
        import flash_attn
        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = "not installed (optional)"
    build = _native.build_info()
    if build:
        ops = _native.native_ops()
        info["native"] = (f"loaded: {build['isa']} kernels (variants: {build['isa_variants']}), "
                          f"{build['threads']} threads, OpenMP {build['openmp']}")
        info["native_build"] = f"{build['compiler']}, {build['flags']}, against torch {build['torch']}"
        info["native_ops"] = ", ".join(ops) or "none"
    else:
        info["native"] = f"not loaded: {_native.unavailable_reason()}"
    cpu_fused = "native C++ where built, else " + ("the Triton interpreter" if triton_mode().startswith("interp")
                                                  else "reference ops")
    info["backends"] = "reference" + (", fused (Triton)" if triton_available() and torch.cuda.is_available() else
                                      f", fused on CPU ({cpu_fused})")
    return info


def main(argv=None) -> int:
    for key, value in collect().items():
        print(f"{key:12s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
