"""The native extension's loader (kernels/_native.py): load order, absence, build facts, `ditengine-info`.
The per-op checks of the C++ kernels live in the op's own test file (test_<op>.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditengine.kernels import _native

from support.native_helpers import requires_native, run_python

ROOT = Path(__file__).resolve().parents[1]


def csrc_cpu_ops() -> set[str]:
    """The ops csrc/*.cpp gives a C++ CPU kernel, read from its `DITENGINE_CPU_OP("op", kernel)` registrations:
    the ground truth the registry-derived lists are checked against."""
    ops = set()
    for path in (ROOT / "csrc").glob("*.cpp"):
        ops.update(re.findall(r'^DITENGINE_CPU_OP\("(\w+)",', path.read_text(), re.M))
    return ops


def test_package_works_without_the_extension():
    out = run_python("""
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        import ditengine as de
        from ditengine.kernels import _native, adaln_modulate, adaln_modulate_ref, choose, scheduler_step
        assert not _native.native_available() and _native.build_info() == {} and _native.native_ops() == ()
        assert set(_native.defined_ops()) >= %r, _native.defined_ops()  # every op with a C++ kernel, and more
        for op in _native.defined_ops():
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU"), op
            assert choose(op, torch.device("cpu")) != "native"
        x, shift, scale = torch.randn(2, 7, 59), torch.randn(2, 59), torch.randn(2, 59)
        torch.testing.assert_close(adaln_modulate(x, shift, scale), adaln_modulate_ref(x, shift, scale))
        sched = de.schedulers.DDIM(5)
        z = torch.randn(1, 4, 3, 3)
        scheduler_step(z, torch.randn(2, 4, 3, 3), sched.table, 1, cfg_scale=2.0)
        try:
            adaln_modulate(x, shift, scale, backend="native")
        except ValueError as err:
            print(err)
        from ditengine.info import collect
        print(collect()["native"])
        assert not torch.cuda.is_initialized()
    """ % (csrc_cpu_ops(),), DITENGINE_NATIVE="0")
    assert "adaln_modulate has no native kernel here: disabled by DITENGINE_NATIVE=0" in out
    assert "not loaded: disabled by DITENGINE_NATIVE=0" in out


def test_absence_is_logged_once():
    proc = subprocess.run([sys.executable, "-c", (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import torch, ditengine\n"
        "from ditengine.kernels import _native, adaln_modulate\n"
        "_native.load(); _native.native_available(); _native.build_info()\n"
        "adaln_modulate(torch.randn(1, 2, 8), torch.randn(1, 8), torch.randn(1, 8))\n")],
        capture_output=True, text=True, env={**os.environ, "DITENGINE_NATIVE": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("native extension disabled by DITENGINE_NATIVE=0") == 1, proc.stderr


def test_an_extension_that_is_not_there_is_not_built_and_import_prints_nothing():
    """The import of ditengine._C really fails (as in a DITENGINE_SKIP_EXT=1 install): `import ditengine` prints
    nothing, the reason is "not built", said once at info level, and the ops run their references."""
    code = ("import sys; sys.modules['ditengine._C'] = None\n"  # importing it now raises ImportError
            "import torch, ditengine\n"
            "from ditengine.kernels import _native, adaln_modulate, adaln_modulate_ref\n"
            "x, s = torch.randn(1, 2, 8), torch.randn(1, 8)\n"
            "torch.testing.assert_close(adaln_modulate(x, s, s), adaln_modulate_ref(x, s, s))\n"
            "assert _native.unavailable_reason() == 'not built' and not _native.built()\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    told = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n" + code],
                          capture_output=True, text=True, timeout=300)
    assert told.stderr.count("INFO:ditengine:ditengine: native extension not built") == 1, told.stderr
    assert "circular" not in told.stderr and "WARNING" not in told.stderr, told.stderr


@requires_native
def test_the_cpu_kernels_are_registered_and_build_facts_reported():
    expected = csrc_cpu_ops()
    assert {"adaln_modulate", "attention", "linear_gelu", "scheduler_step"} <= expected, expected  # the parse works
    assert set(_native.native_ops()) == expected, "the ops the extension serves are not the ones csrc/ registers"
    for op in expected:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU"), op
        assert _native.serves(op)
    info = _native.build_info()
    assert info["isa"] in ("avx512", "avx2", "baseline")
    assert "-O3" in info["flags"] and "-fopenmp" in info["flags"] and "march=native" not in info["flags"]
    assert info["threads"] >= 1 and info["torch"] == torch.__version__.split("+")[0]
    from ditengine.info import collect
    facts = collect()
    assert facts["native"].startswith(f"loaded: {info['isa']} kernels")
    assert facts["native_ops"] == ", ".join(sorted(expected))


def test_isa_request_accepts_only_the_kernel_variants(monkeypatch):
    for value, expected in (("avx512", "avx512"), ("avx2", "avx2"), ("baseline", "baseline"), ("", None)):
        monkeypatch.setenv("DITENGINE_ISA", value)
        assert _native.requested_isa() == expected
    monkeypatch.delenv("DITENGINE_ISA")
    assert _native.requested_isa() is None
    for value in ("AVX2", "avx512f", "sse4", " avx2"):  # csrc/cpu.cpp would ignore each and run the best
        monkeypatch.setenv("DITENGINE_ISA", value)
        with pytest.raises(ValueError, match=rf"DITENGINE_ISA={value!r}: expected one of avx512, avx2, baseline"):
            _native.requested_isa()


def test_unknown_isa_fails_the_import():
    out = run_python("""
        try:
            import ditengine
        except ValueError as err:
            print(f"refused: {err}")
        else:
            raise SystemExit("import ditengine succeeded with DITENGINE_ISA=avx512f")
    """, DITENGINE_ISA="avx512f")
    assert out.strip() == ("refused: DITENGINE_ISA='avx512f': expected one of avx512, avx2, baseline (or unset for "
                           "the best this CPU runs)")


def test_isa_the_cpu_lacks_is_capped_with_one_warning():
    """An extension that capped DITENGINE_ISA=avx512 at avx2 (what an AVX2-only CPU does), stood in for by a
    fake ditengine._C so the warning path runs on any CPU."""
    out = run_python("""
        import logging, sys, types
        logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
        fake = types.ModuleType("ditengine._C")
        fake.isa = lambda: "avx2"
        fake.build_info = lambda: {"isa": "avx2"}
        sys.modules["ditengine._C"] = fake
        import ditengine
        from ditengine.kernels import _native
        assert _native.load() is fake and _native.native_available()
        _native.build_info()
    """, DITENGINE_ISA="avx512")
    warning = "ditengine: DITENGINE_ISA=avx512 asks for kernels this CPU cannot run; the native kernels use avx2"
    assert out.count(warning) == 1, out


@requires_native
def test_library_loaded_before_the_ops_are_defined():
    """The shared library may come first (torch.ops.load_library): its CPU kernels wait for the Python schema."""
    import ditengine._C
    out = run_python("""
        import torch
        torch.ops.load_library(%r)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("ditengine::adaln_modulate", "CPU")
        import ditengine
        from ditengine.kernels import adaln_modulate, adaln_modulate_ref, choose
        x, shift, scale = torch.randn(2, 7, 59), torch.randn(2, 59), torch.randn(2, 59)
        with torch.profiler.profile() as prof:
            y = torch.ops.ditengine.adaln_modulate(x, shift, scale, 1e-6, torch.float32)
        assert "aten::layer_norm" not in {e.name for e in prof.events()}
        torch.testing.assert_close(y, adaln_modulate_ref(x, shift, scale))
        print(choose("adaln_modulate", x.device))
    """ % (ditengine._C.__file__,))
    assert out.strip() == "native"


def test_importing_ditengine_leaves_cuda_alone():
    out = run_python("""
        import torch, ditengine
        from ditengine.kernels import _native
        _native.load()
        print(torch.cuda.is_initialized())
    """)
    assert out.strip() == "False"


def test_setup_installs_pure_python_when_asked():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "DITENGINE_SKIP_EXT": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ditengine"
    assert "not building the native extension (DITENGINE_SKIP_EXT is set)" in proc.stderr
