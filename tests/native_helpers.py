"""Helpers for the tests of the native extension's CPU kernels (csrc/), shared by the per-op test files."""
import os
import subprocess
import sys
import textwrap

import pytest

from ditengine.kernels import _native

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
