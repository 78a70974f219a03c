"""A pytest plugin the fault runner loads into the test process it starts (`-p ditengine_faults_guard`): once the
tests are collected (tests/conftest.py has set up Triton's interpreter by then), it checks that `ditengine`, its
kernels and its native extension were imported from the scratch copy the fault was applied to, not from the
editable install in the developer's tree, and writes what it found as JSON to $DITENGINE_FAULTS_GUARD_OUT. A
module from elsewhere stops the session (exit status 3), so the runner reports an error rather than a result.

The runner copies this file into the scratch copy's import root under the name ditengine_faults_guard.py.
"""
import json
import os
import sys
from pathlib import Path

import pytest


def _inside(path: str | None, root: Path) -> bool:
    if path is None:
        return False
    p = Path(path)
    return p.is_relative_to(root) and p.resolve().is_relative_to(root)


def pytest_collection_finish(session):
    root = Path(os.environ["DITENGINE_FAULTS_ROOT"]).resolve()
    import ditengine
    import ditengine.kernels
    from ditengine.kernels import _native

    native = _native.load()
    found = {"ditengine": ditengine.__file__, "ditengine.kernels": ditengine.kernels.__file__,
             "ditengine._C": None if native is None else native.__file__}
    bad = [name for name, path in found.items() if path is not None and not _inside(path, root)]
    report = {"root": str(root), "modules": found, "bad": bad, "native": native is not None,
              "native_reason": _native.unavailable_reason(), "executable": sys.executable}
    Path(os.environ["DITENGINE_FAULTS_GUARD_OUT"]).write_text(json.dumps(report))
    if bad:
        pytest.exit(f"ditengine_faults_guard: {', '.join(bad)} imported from outside {root}: {found}", returncode=3)
