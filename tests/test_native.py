"""The native extension's loader (kernels/_native.py): load order, absence, build facts, `ditengine-info`.
The per-op checks of the C++ kernels live in the op's own test file (test_adaln.py, test_scheduler_step.py)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from ditengine.kernels import _native

from native_helpers import requires_native, run_python

NATIVE_OPS = ("adaln_modulate", "gated_residual_adaln", "gated_residual_adaln_", "scheduler_step")


def test_package_works_without_the_extension():
    out = run_python("""
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        import ditengine as de
        from ditengine.kernels import _native, adaln_modulate, adaln_modulate_ref, choose, scheduler_step
        assert not _native.native_available() and _native.build_info() == {}
        for op in %r:
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
    """ % (NATIVE_OPS,), DITENGINE_NATIVE="0")
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


@requires_native
def test_the_cpu_kernels_are_registered_and_build_facts_reported():
    for op in NATIVE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU"), op
        assert _native.serves(op)
    info = _native.build_info()
    assert info["isa"] in ("avx512", "avx2", "baseline")
    assert "-O3" in info["flags"] and "-fopenmp" in info["flags"] and "march=native" not in info["flags"]
    assert info["threads"] >= 1 and info["torch"] == torch.__version__.split("+")[0]
    from ditengine.info import collect
    facts = collect()
    assert facts["native"].startswith(f"loaded: {info['isa']} kernels")
    assert "adaln_modulate" in facts["native_ops"] and "scheduler_step" in facts["native_ops"]


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
