"""Helpers for the tests of the native extension's CPU kernels (csrc/), shared by the per-op test files."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ditengine.kernels import _native, interpreting

# The native tests run wherever the extension is built (CI builds it and checks that it loads); they skip
# only where it genuinely is not, saying why.
requires_native = pytest.mark.skipif(not _native.native_available(),
                                     reason=f"native extension not loaded: {_native.unavailable_reason()}")


def run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter with extra environment variables; returns its stdout, fails the test
    with its stderr when it exits non-zero."""
    full_env = {**os.environ, **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def needs_native(op: str):
    """Skip unless the extension registered a C++ CPU kernel for ditengine::<op>."""
    return pytest.mark.skipif(not _native.serves(op), reason=f"native extension has no kernel for {op}: "
                                                             f"{_native.unavailable_reason() or 'not registered'}")


# The Triton kernel on CPU tensors is the interpreter, asked for by name because the native kernel (where built)
# is the CPU default. Without TRITON_INTERPRET=1 "auto" would run the native kernel or the reference, and a
# test would compare the reference with itself: such tests skip instead.
triton_cpu = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (a GPU "
                                "machine runs the Triton kernels on CUDA tensors in the gpu tests)")

# The best variant this CPU runs, asked of torch rather than of the extension under test: csrc/cpu.cpp tests the
# same features (AVX2 + FMA; AVX-512 F, BW, VL, DQ) as torch's CPU capability.
CPU_ISA = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
ISA_RANK = {"baseline": 0, "avx2": 1, "avx512": 2}


def isa_runner(tmp_path_factory, code: str):
    """isa -> what `code` saved to "{path}" with DITENGINE_ISA=isa (its first entry the ISA the extension
    ran), computed once per ISA in a fresh interpreter, after checking that the extension ran that ISA (or,
    for one this CPU lacks, the best it has)."""
    results = {}

    def run(isa):
        if isa not in results:
            path = tmp_path_factory.mktemp("isa") / f"{isa}.pt"
            run_python(code.replace("{path}", str(path)), DITENGINE_ISA=isa)
            ran, *outs = torch.load(path)
            expected = min(isa, CPU_ISA, key=ISA_RANK.get)
            assert ran == expected, f"DITENGINE_ISA={isa} ran the {ran} kernels, expected {expected}"
            results[isa] = outs
        return results[isa]

    return run


def skip_unless_cpu_runs(isa: str) -> None:
    if ISA_RANK[CPU_ISA] < ISA_RANK[isa]:
        pytest.skip(f"this CPU lacks {isa} (torch reports {torch.backends.cpu.get_cpu_capability()}): "
                    f"DITENGINE_ISA={isa} would run the {CPU_ISA} kernels again")
