import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. From the repository root that makes the source
# folders importable as top-level modules, and `kernels` then shadows the PyPI package of that name, which
# diffusers imports when it finds it. The project is imported as `ditengine` (installed) only.
_REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]

import torch  # noqa: E402  (importing torch does not import Triton)

# Triton's interpreter must be chosen before any kernel module imports Triton: without a GPU the kernels
# run through it (docs/design.md section 6). On a GPU machine they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One pinned attention config under test: autotuning would time every config for every new shape.
os.environ.setdefault("DITENGINE_AUTOTUNE", "0")

import pytest  # noqa: E402


INTERPRETER_BUG = "only 0-dimensional arrays can be converted to Python scalars"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where Triton < 3.7 meets numpy >= 2.4, a test that fails on that pair's interpreter bug is reported
    as skipped with the reason; every other failure still fails."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and INTERPRETER_BUG in str(call.excinfo.value):
        from ditengine.kernels import interpreter_numpy_bug

        reason = interpreter_numpy_bug()
        if reason is not None and os.environ.get("TRITON_INTERPRET") == "1":
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    import ditengine as de
    return de.DiTConfig.from_name("DiT-T/2", input_size=8, num_classes=10)


@pytest.fixture
def tiny_model(tiny_cfg):
    import ditengine as de
    torch.manual_seed(0)
    return de.DiT(tiny_cfg).eval()


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts the Triton kernels launched through the interpreter, by kernel name: a test that says it runs
    the Triton kernels asserts they actually ran (with the native extension built, CPU tensors go to C++
    unless `backend="triton"` is asked for)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (a GPU machine tests them on CUDA)")
    from collections import Counter

    from triton.runtime.interpreter import InterpretedFunction

    counts = Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts
