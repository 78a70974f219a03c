"""Build hook for the native extension ditengine._C (csrc/); package metadata lives in pyproject.toml.

Every csrc/*.cpp is compiled into one shared library with torch's C++ extension tooling: C++17, -O3,
OpenMP, and no -march (the kernels pick AVX-512, AVX2 or baseline code at run time, so the binary runs on
any x86-64 CPU). torch must be importable by the build: install with
`pip install --no-build-isolation -e .`. Without torch, without a C++ compiler, or with
DITENGINE_SKIP_EXT=1, the pure-Python package is installed and the kernels fall back to Triton or the
PyTorch reference (`ditengine-info` says which). A compile error fails the install, saying how to skip it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# torch 2.13's headers use a few C++20 extensions that GCC accepts in C++17 mode with a warning each.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-Wno-c++20-extensions"]


def _notice(reason: str) -> None:
    print(f"ditengine: not building the native extension ({reason}); installing the pure-Python package",
          file=sys.stderr)


def _compiler_works() -> bool:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        return False
    try:
        return subprocess.run([cxx.split()[0], "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def native_build() -> dict:
    if os.environ.get("DITENGINE_SKIP_EXT", "0") not in ("", "0"):
        _notice("DITENGINE_SKIP_EXT is set")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as err:  # torch missing (build isolation?) or broken
        _notice(f"torch is not importable at build time: {err}; use pip install --no-build-isolation")
        return {}
    if not _compiler_works():
        _notice("no usable C++ compiler")
        return {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return {}
    # Commas, not spaces, so that the flags survive a shell (ninja) as one macro argument.
    flags_macro = "-DDITENGINE_BUILD_FLAGS=" + ",".join(CXX_FLAGS)
    ext = CppExtension("ditengine._C", sources, include_dirs=[str(ROOT / "csrc")],
                       extra_compile_args=CXX_FLAGS + [flags_macro], extra_link_args=["-fopenmp"])

    class BuildNative(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:
                raise RuntimeError(f"ditengine: building the native extension failed ({err}); set "
                                   "DITENGINE_SKIP_EXT=1 to install the pure-Python package") from err

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildNative}}


setup(**native_build())
