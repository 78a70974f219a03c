"""The kernel backends as a test parameter: one test body runs against every implementation of an op.

    @pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
    def test_matches_reference(backend): ...

On CPU tensors the op has up to three implementations: its C++ kernel ("native", where the extension serves
the op), its Triton kernel through the interpreter ("triton", with TRITON_INTERPRET=1) and the PyTorch
reference ("reference"). A backend that cannot run here is a skipped case that says why, never a silent
comparison of the reference with itself.
"""
import re

import pytest

from ditengine.kernels import _native, interpreting

ALL = ("native", "triton", "reference")


def cpu_backends(op: str, backends: tuple[str, ...] = ALL) -> list:
    """pytest params, one per backend of `op` on CPU tensors, each skipped with its reason where it cannot run."""
    params = []
    for backend in backends:
        marks = ()
        if backend == "native" and not _native.serves(op):
            marks = pytest.mark.skip(reason=f"native extension has no kernel for {op}: "
                                            f"{_native.unavailable_reason() or 'not registered'}")
        elif backend == "triton" and not interpreting():
            marks = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (a GPU machine runs the "
                                            "Triton kernels on CUDA tensors in the gpu tests)")
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def bad_input_table(rows, backends) -> list:
    """pytest params (call, backend, error, match) for a bad-input table: every row (name, call, error, match[,
    gaps]) against every backend param, a strict xfail where the row's `gaps` {backend: reason} says that backend
    fails."""
    params = []
    for name, call, error, match, *gaps in rows:
        gaps = gaps[0] if gaps else {}
        for backend in backends:
            where = backend.values[0]
            marks = [*backend.marks, *([pytest.mark.xfail(strict=True, reason=gaps[where])] if where in gaps else [])]
            params.append(pytest.param(call, where, error, match, marks=marks, id=f"{name}-{backend.id}"))
    return params


def ident(value) -> str:
    return str(value).removeprefix("torch.").replace(" ", "")


def per_backend(op: str, cases, backends: tuple[str, ...] = ALL) -> list:
    """pytest params (backend, *case), `cases(backend)` giving each backend's own cases; a backend that cannot run
    here keeps its skip (and its reason) from `cpu_backends`."""
    params = []
    for backend_param in cpu_backends(op, backends):
        backend = backend_param.values[0]
        for case in cases(backend):
            params.append(pytest.param(backend, *case, marks=backend_param.marks,
                                       id="-".join([backend_param.id, *map(ident, case)])))
    return params


def assert_raises_as_the_function(run, path: str, error: type, match: str, cpp_match: str, body_match: str | None,
                                  description: str) -> None:
    """`run()` calls the registered op, through its C++ kernel (`path` "native") or its Python body: it must raise
    what the public function raises (`error`), with a message naming the argument (`cpp_match` for C++,
    `body_match` or else the function's `match` for the body)."""
    try:
        run()
    except Exception as err:  # its type is asserted below
        raised = err
    else:
        raise AssertionError(f"the op's {path} accepted it ({description})")
    op_match = cpp_match if path == "native" else body_match or match
    assert re.search(op_match, str(raised)), f"the {path} message does not name the argument: {raised}"
    assert type(raised) is error, f"the {path} raised {type(raised).__name__}, Python {error.__name__}: {raised}"
