"""Cross-attention to a right-padded caption (kernels/cross_attention.py, csrc/cross_attention.cpp): each property
tested once, against every backend that runs on CPU tensors (the native CPU kernel in fp32, bf16, fp16; the Triton
kernel through the interpreter in fp32, fp16; the reference where the property is not the reference itself) under
the tolerance rule; lengths 1, full, mixed per row and on every block edge; keys past a row's length never read; a
NaN kept in its row; one table of bad inputs for every backend, and the C++ checks agreeing with it; the op's fake
implementation and opcheck; PixArt shapes on a GPU."""
import functools
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import choose, cross_attention, cross_attention_ref, interpreting
from ditengine.kernels.attention import AUTOTUNE_CONFIGS

from support.backends import assert_raises_as_the_function, cpu_backends, ident, per_backend as cases_per_backend
from support.native_helpers import needs_native, run_python, triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

xattn = importlib.import_module("ditengine.kernels.cross_attention")  # the module; the package exports the function


def make_inputs(B, Tq, H, Dh, L, lens, dtype, device="cpu", seed=0, q_pad=8):
    """q (B, Tq, H, Dh) as a per-head view of a projection output with `q_pad` more columns (token stride
    H*Dh + q_pad: a strided view, as a fused projection gives), kv (B, L, 2, H, Dh) as a view of the k/v
    projection's (B, L, 2*H*Dh) output, and kv_lens (B,) int64."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, Tq, H * Dh + q_pad, generator=g).to(device=device, dtype=dtype)
    q = proj[..., q_pad:].unflatten(-1, (H, Dh))
    kv = torch.randn(B, L, 2 * H * Dh, generator=g).to(device=device, dtype=dtype).view(B, L, 2, H, Dh)
    return q, kv, torch.tensor(lens, device=device)


def references(q, kv, kv_lens, softmax_scale=None):
    """(ref_hi, ref_lp) for the tolerance rule: fp32 inputs against the reference on float64 copies (ref_lp the
    fp32 reference); fp16 / bf16 against the fp32-math reference (ref_lp the reference in the inputs' dtype)."""
    if q.dtype == torch.float32:
        return (cross_attention_ref(q.double(), kv.double(), kv_lens, softmax_scale),
                cross_attention_ref(q, kv, kv_lens, softmax_scale))
    return (cross_attention_ref(q, kv, kv_lens, softmax_scale),
            cross_attention_ref(q, kv, kv_lens, softmax_scale, upcast=False))


def check(out, q, kv, kv_lens, name, softmax_scale=None):
    B, Tq, H, Dh = q.shape
    assert out.shape == (B, Tq, H, Dh) and out.is_contiguous() and out.dtype == q.dtype, name
    ref_hi, ref_lp = references(q, kv, kv_lens, softmax_scale)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), name)


def poison_padding(kv, kv_lens, value):
    """kv with `value` in every key and value past each row's length."""
    kv = kv.clone()
    for b, n in enumerate(kv_lens.tolist()):
        kv[b, n:] = value
    return kv


FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# The dtypes each backend runs on CPU tensors: the interpreter's bf16 is wrong (docs/numerics.md), so Triton's bf16
# runs under the gpu marker only.
CPU_DTYPES = {"native": (FP32, BF16, FP16), "triton": (FP32, FP16), "reference": (FP32, BF16, FP16)}
# The kernels: the reference backend is cross_attention_ref itself, so a comparison with the reference, or a property
# of the kernels alone (the padding never read), leaves it out.
KERNELS = ("native", "triton")


per_backend = functools.partial(cases_per_backend, "cross_attention")  # (cases, backends) -> pytest params


def run(backend, q, kv, kv_lens, request, config=None, softmax_scale=None):
    """`backend` on the inputs; on Triton, with its launches counted through the interpreter: one kernel launch."""
    launches = request.getfixturevalue("triton_launches") if backend == "triton" else None
    out = cross_attention(q, kv, kv_lens, softmax_scale=softmax_scale, backend=backend, config=config)
    if launches is not None:
        assert launches == {"_attention_fwd_kernel": 1}, launches
    return out


# -- every backend ------------------------------------------------------------------------------------------
# (B, Tq, H, Dh, L, lens). The interpreter's: one key, full rows, mixed rows, odd Tq and L, head dims 72 (64 + 16),
# 64 and 16; one row past several 32-key blocks (the pinned interpreter tiles are 32 x 32).
TRITON_CASES = [(2, 33, 1, 72, 40, [40, 1]), (2, 20, 2, 64, 7, [3, 7]), (1, 16, 2, 16, 120, [120]),
                (3, 9, 1, 72, 97, [97, 33, 1])]
# The native kernel's: PixArt-like (L = 300, a caption of 20 and a negative prompt of 1), full and mixed rows, a single
# query and a single key, odd Tq, and rows of more keys than one 512-key block (the online softmax across blocks).
NATIVE_CASES = [(2, 97, 3, 72, 300, [20, 1]), (2, 64, 2, 64, 120, [120, 57]), (1, 1, 2, 16, 7, [7]),
                (3, 33, 2, 72, 7, [1, 7, 4]), (2, 130, 2, 16, 1100, [1100, 513])]


def reference_cases(backend):
    cases = NATIVE_CASES if backend == "native" else TRITON_CASES
    return [(*case, dtype) for case in cases for dtype in CPU_DTYPES[backend]]


@pytest.mark.parametrize("backend, B, Tq, H, Dh, L, lens, dtype", per_backend(reference_cases, KERNELS))
def test_matches_reference(backend, B, Tq, H, Dh, L, lens, dtype, request):
    q, kv, kv_lens = make_inputs(B, Tq, H, Dh, L, lens, dtype, seed=Tq + L + Dh)
    if L > 512:  # the largest logits in the last key block: the running max changes between blocks
        kv[:, 900:, 0] *= 4.0
    out = run(backend, q, kv, kv_lens, request)
    check(out, q, kv, kv_lens, f"{backend} B={B} Tq={Tq} H={H} Dh={Dh} L={L} lens={lens} {ident(dtype)}")


# Lengths on every edge of the forced Triton config's key blocks (BLOCK_N = 16: 1, BLOCK_N - 1, BLOCK_N, BLOCK_N + 1,
# twice that, L), with L itself off and on a block edge; for the native kernel also on the edges of its own blocks
# (csrc/softmax_rows.h: BLOCK_N = 512 keys per online-softmax step). 21 queries: a partial second tile of BLOCK_M = 16.
# In fp32, and bf16 on the native kernel, which widens its blocks as it loads them: the key masking is the same code in
# every dtype.
EDGE_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)
EDGE_LENGTHS = [(47, [1, 15, 16, 17, 31, 32, 33, 47]), (16, [1, 15, 16]), (17, [16, 17, 1])]
NATIVE_EDGE_LENGTHS = [(600, [1, 511, 512, 513, 600])]


def edge_cases(backend):
    lengths = EDGE_LENGTHS + (NATIVE_EDGE_LENGTHS if backend == "native" else [])
    return [(L, lens, dtype) for L, lens in lengths for dtype in ((FP32, BF16) if backend == "native" else (FP32,))]


@pytest.mark.parametrize("backend, L, lens, dtype", per_backend(edge_cases, KERNELS))
def test_lengths_on_block_edges(backend, L, lens, dtype, request):
    q, kv, kv_lens = make_inputs(len(lens), 21, 1, 72, L, lens, dtype, seed=L)
    out = run(backend, q, kv, kv_lens, request, config=EDGE_CONFIG if backend == "triton" else None)
    check(out, q, kv, kv_lens, f"{backend} L={L} lens={lens} {ident(dtype)}")


def padding_cases(backend):
    return [(FP32,)] if backend == "triton" else [(dtype,) for dtype in CPU_DTYPES[backend]]


@pytest.mark.parametrize("backend, dtype", per_backend(padding_cases, KERNELS))
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice encountered")
def test_ignores_the_padding_and_keeps_nan_in_its_row(backend, dtype):
    """NaN and a huge value past the lengths change nothing; a NaN query row stays in its row (rows 7 and 66: the
    first and a later query tile of either kernel); a NaN in a valid key poisons that (batch, head) only, as in the
    reference. The kernels only: the reference reads the padding (0 * NaN is NaN in its einsum). The interpreter in
    fp32 only (its four calls take about a second a dtype)."""
    q, kv, kv_lens = make_inputs(2, 70, 2, 72, 40, [17, 1], dtype, seed=6)
    clean = cross_attention(q, kv, kv_lens, backend=backend)
    for value in (float("nan"), 1e30 if dtype == torch.float32 else 6e4):
        assert torch.equal(cross_attention(q, poison_padding(kv, kv_lens, value), kv_lens, backend=backend), clean), \
            value
    q, kv = q.clone(), poison_padding(kv, kv_lens, float("nan"))
    q[0, 7, 1, 3] = float("nan")  # one query row of batch 0, head 1
    q[0, 66, 1, 3] = float("nan")  # and one in a later query tile
    kv[1, 0, 0, 0, 5] = float("nan")  # the only valid key of batch 1, head 0
    out = cross_attention(q, kv, kv_lens, backend=backend)
    bad = torch.zeros(2, 70, 2, dtype=torch.bool)
    bad[0, 7, 1] = bad[0, 66, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.equal(out[~bad], clean[~bad])


@pytest.mark.parametrize("backend", cpu_backends("cross_attention", KERNELS))
def test_scale_int32_strided_lengths_and_overlapping_rows(backend):
    q, kv, kv_lens = make_inputs(3, 10, 2, 16, 9, [2, 9, 5], torch.float32, seed=8)
    lens32 = torch.tensor([[2, 0], [9, 0], [5, 0]], dtype=torch.int32)[:, 0]  # int32, stride 2
    out = cross_attention(q, kv, lens32, softmax_scale=0.7, backend=backend)
    check(out, q, kv, kv_lens, "scale 0.7, int32 strided lengths", softmax_scale=0.7)
    assert torch.equal(out, cross_attention(q, kv, kv_lens, softmax_scale=0.7, backend=backend))
    # Rows overlapping in memory (a token stride of 0): the native kernel materialises them for BLAS.
    q1 = q[:, :1].expand(3, 10, 2, 16)
    kv1 = kv[:, :1].expand(3, 9, 2, 2, 16)
    torch.testing.assert_close(cross_attention(q1, kv1, kv_lens, backend=backend),
                               cross_attention_ref(q1, kv1, kv_lens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("cross_attention"))
def test_one_key_gives_its_value(backend):
    """A one-token prompt (the negative prompt): softmax over one key is 1, so every query row is that value."""
    q, kv, kv_lens = make_inputs(2, 9, 3, 64, 120, [1, 1], torch.float32, seed=7)
    out = cross_attention(q, kv, kv_lens, backend=backend)
    assert torch.equal(out, kv[:, :1, 1].expand_as(out))


def same_bits_cases(backend):
    # The interpreter in fp16 at a smaller shape (it takes 0.8 s a call at the others'); the others in fp32 and bf16
    # with several query tiles per head, spread over the threads.
    if backend == "triton":
        return [(FP16, (2, 33, 2, 72, 40, [40, 1]), 2)]
    return [(dtype, (2, 200, 3, 72, 300, [120, 1]), 4) for dtype in (FP32, BF16)]


@pytest.mark.parametrize("backend, dtype, case, runs", per_backend(same_bits_cases))
def test_same_inputs_same_bits(backend, dtype, case, runs):
    q, kv, kv_lens = make_inputs(*case, dtype, seed=9)
    first = cross_attention(q, kv, kv_lens, backend=backend)
    assert all(torch.equal(first, cross_attention(q, kv, kv_lens, backend=backend)) for _ in range(runs - 1))


# -- bad inputs: one table, every backend --------------------------------------------------------------------
def bad_inputs():
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32, seed=21)
    q12, kv12, _ = make_inputs(2, 5, 2, 12, 7, [3, 7], torch.float32, seed=22)
    return SimpleNamespace(q=q, kv=kv, kv_lens=kv_lens, q12=q12, kv12=kv12)


def strided_last(t):
    """`t` with the same shape and a last dimension of stride > 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# (description, bad call of `cross_attention` as f(x) with x from bad_inputs(), exception type, regex naming the
# argument)
BAD_INPUTS = [
    ("q is not a tensor", lambda f, x: f(x.q.tolist(), x.kv, x.kv_lens), TypeError,
     r"q: expected a torch\.Tensor, got list"),
    ("q has 3 dimensions", lambda f, x: f(x.q.flatten(2), x.kv, x.kv_lens), ValueError,
     r"q: expected 4 dimensions \(B, Tq, H, Dh\), got shape \(2, 5, 32\)"),
    ("q is float64", lambda f, x: f(x.q.double(), x.kv.double(), x.kv_lens), TypeError,
     r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64"),
    ("q is int64", lambda f, x: f(x.q.long(), x.kv.long(), x.kv_lens), TypeError,
     r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got int64"),
    ("q last dim strided", lambda f, x: f(strided_last(x.q), x.kv, x.kv_lens), ValueError,
     r"q: the last dimension must be contiguous \(stride 1\)"),
    ("q head dim 0", lambda f, x: f(x.q[..., :0], x.kv[..., :0], x.kv_lens), ValueError,
     r"q: the head dim must be positive, got shape \(2, 5, 2, 0\)"),
    ("q has no tokens", lambda f, x: f(x.q[:, :0], x.kv, x.kv_lens), ValueError,
     "cross_attention: sequence lengths must be at least 1, got q 0, kv 7"),
    ("q head dim 12", lambda f, x: f(x.q12, x.kv12, x.kv_lens), ValueError,
     r"head dim 12 is not supported: expected a multiple of 8 from 16 to 256 \(cross_attention_ref takes any\)"),
    ("kv dim 2 is not 2", lambda f, x: f(x.q, x.kv[:, :, :1], x.kv_lens), ValueError,
     r"kv: expected shape \(2, \*, 2, 2, 16\) \(B, L, 2, H, Dh\): the packed k/v projection, batch, heads and head "
     r"dim as q, got \(2, 7, 1, 2, 16\)"),
    ("kv has other heads", lambda f, x: f(x.q, x.kv[:, :, :, :1], x.kv_lens), ValueError,
     r"kv: expected shape \(2, \*, 2, 2, 16\) .*, got \(2, 7, 2, 1, 16\)"),
    ("kv has another batch", lambda f, x: f(x.q, x.kv[:1], x.kv_lens), ValueError,
     r"kv: expected shape \(2, \*, 2, 2, 16\) .*, got \(1, 7, 2, 2, 16\)"),
    ("kv has another dtype", lambda f, x: f(x.q, x.kv.half(), x.kv_lens), TypeError,
     r"kv: expected dtype in \['float32'\], got float16"),
    ("kv on another device", lambda f, x: f(x.q, x.kv.to("meta"), x.kv_lens), ValueError,
     "kv: on meta, expected cpu like the other inputs"),
    ("kv last dim strided", lambda f, x: f(x.q, strided_last(x.kv), x.kv_lens), ValueError,
     "kv: the last dimension must be contiguous"),
    ("kv has no keys", lambda f, x: f(x.q, x.kv[:, :0], x.kv_lens.clamp(max=0)), ValueError,
     "cross_attention: sequence lengths must be at least 1, got q 5, kv 0"),
    ("kv_lens is float", lambda f, x: f(x.q, x.kv, x.kv_lens.float()), TypeError,
     r"kv_lens: expected dtype in \['int32', 'int64'\], got float32"),
    # "(2)": kernels/_checks.py prints a 1-D expected shape without Python's comma today; "(2,)" once it does.
    ("kv_lens has another shape", lambda f, x: f(x.q, x.kv, x.kv_lens[:1]), ValueError,
     r"kv_lens: expected shape \(2,?\) \(B,\): valid keys per row, got \(1,\)"),
    ("kv_lens on another device", lambda f, x: f(x.q, x.kv, x.kv_lens.to("meta")), ValueError,
     "kv_lens: on meta, expected cpu like the other inputs"),
    *((f"kv_lens {bad}", lambda f, x, bad=bad: f(x.q, x.kv, torch.tensor(bad)), ValueError,
       rf"kv_lens: expected values in \[1, 7\] \(the valid keys of each row\), got \[{min(bad)}, {max(bad)}\]")
      for bad in ([0, 7], [3, 8], [-1, 2])),
]
BAD = {row[0]: row[1:] for row in BAD_INPUTS}


@pytest.mark.parametrize("backend", [*cpu_backends("cross_attention"), pytest.param(None, id="default")])
@pytest.mark.parametrize("call, error, match", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS])
def test_bad_inputs(backend, call, error, match):
    """Each backend (and the default) refuses a bad argument in Python with the same error, naming the argument (on
    CUDA too, where the C++ checks never run)."""
    with pytest.raises(error, match=match):
        call(lambda *args: xattn.cross_attention(*args, backend=backend), bad_inputs())


# The same mistakes made in a direct call of the registered op: on CPU tensors its C++ kernel
# (csrc/cross_attention.cpp) checks them, and past it (on CUDA, or on CPU without the extension) its Python body,
# with the public function's check (kernels/cross_attention.py `check_inputs`; on CUDA it reads no kv_lens values).
# Each path raises the public function's exception type and names the argument: {description: (op call as f(x),
# regex of the C++ message, regex of the Python body's message or None for the public function's)}. What the public
# function refuses and the op runs on every path is left out: float64 (SDPA), head dims outside 16..256 (the C++
# GEMMs take any; the Python body runs SDPA where the Triton kernel cannot) and no queries (an empty output); see
# test_op_runs_what_only_the_function_refuses. A meta kv or kv_lens beside a CPU q is asked of the Python body only:
# PyTorch's dispatcher sends a direct call with a meta tensor among CPU tensors to the op's fake implementation, so
# the C++ kernel never sees it (PyTorch's dispatch, not fought here).
OP = "ditengine::cross_attention: "
OP_CALLS = {
    "q has 3 dimensions": (lambda op, x: op(x.q.flatten(2), x.kv, x.kv_lens, 0.25),
                           OP + r"q must be \(B, Tq, H, Dh\), got 3 dimensions with shape \[2, 5, 32\]", None),
    "q is int64": (lambda op, x: op(x.q.long(), x.kv.long(), x.kv_lens, 0.25),
                   OP + "q must be float32, bfloat16, float16 or float64, got Long",
                   r"q: expected dtype in \['float32', 'float16', 'bfloat16', 'float64'\], got int64"),
    "q last dim strided": (lambda op, x: op(strided_last(x.q), x.kv, x.kv_lens, 0.25),
                           OP + r"q: the last dimension \(Dh\) must be contiguous", None),
    "q head dim 0": (lambda op, x: op(x.q[..., :0], x.kv[..., :0], x.kv_lens, 0.25),
                     OP + r"q: the head dim must be positive, got shape \[2, 5, 2, 0\]", None),
    **{name: (lambda op, x, view=view: op(x.q, view(x.kv), x.kv_lens, 0.25),
              OP + rf"kv must be \(B, L, 2, H, Dh\) with q's batch, heads and head dim \(2, \*, 2, 2, 16\), got shape "
                   rf"\[{shape}\]", None)
       for name, view, shape in (("kv dim 2 is not 2", lambda kv: kv[:, :, :1], "2, 7, 1, 2, 16"),
                                 ("kv has other heads", lambda kv: kv[:, :, :, :1], "2, 7, 2, 1, 16"),
                                 ("kv has another batch", lambda kv: kv[:1], "1, 7, 2, 2, 16"))},
    "kv has another dtype": (lambda op, x: op(x.q, x.kv.half(), x.kv_lens, 0.25),
                             OP + "kv has dtype Half but q has Float", None),
    "kv on another device": (lambda op, x: op(x.q, x.kv.to("meta"), x.kv_lens, 0.25), None, None),
    "kv last dim strided": (lambda op, x: op(x.q, strided_last(x.kv), x.kv_lens, 0.25),
                            OP + r"kv: the last dimension \(Dh\) must be contiguous", None),
    "kv has no keys": (lambda op, x: op(x.q, x.kv[:, :0], x.kv_lens.clamp(max=0), 0.25),
                       OP + r"kv needs at least one key \(L = 0\)", None),
    "kv_lens is float": (lambda op, x: op(x.q, x.kv, x.kv_lens.float(), 0.25),
                         OP + "kv_lens must be int32 or int64, got Float", None),
    "kv_lens has another shape": (lambda op, x: op(x.q, x.kv, x.kv_lens[:1], 0.25),
                                  OP + r"kv_lens must be \(B,\) = \(2,\), got shape \[1\]", None),
    "kv_lens on another device": (lambda op, x: op(x.q, x.kv, x.kv_lens.to("meta"), 0.25), None, None),
    **{f"kv_lens {bad}": (lambda op, x, bad=bad: op(x.q, x.kv, torch.tensor(bad), 0.25),
                          OP + rf"kv_lens: expected values in \[1, 7\] \(the valid keys of each row\), got "
                               rf"\[{min(bad)}, {max(bad)}\]", None)
       for bad in ([0, 7], [3, 8], [-1, 2])},
}
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def python_body(*args):
    """The registered op's Python body, reached past its C++ CPU kernel (as on CUDA, or without the extension)."""
    return torch.ops.ditengine.cross_attention.default.redispatch(PYTHON_BODY, *args)


@pytest.mark.parametrize("path", [pytest.param("native", marks=needs_native("cross_attention")), "python body"])
@pytest.mark.parametrize("description", OP_CALLS)
def test_op_checks_agree_with_the_function(description, path):
    """The op's checks raise what the public function raises (csrc/checks.h; kernels/cross_attention.py
    `check_inputs`), and name the argument too."""
    call, error, match = BAD[description]
    with pytest.raises(error, match=match):
        call(xattn.cross_attention, bad_inputs())
    op_call, cpp_match, body_match = OP_CALLS[description]
    if path == "native" and cpp_match is None:
        pytest.skip("a meta tensor among CPU tensors goes to the op's fake implementation (PyTorch's dispatch)")
    op = torch.ops.ditengine.cross_attention if path == "native" else python_body
    assert_raises_as_the_function(lambda: op_call(op, bad_inputs()), path, error, match, cpp_match, body_match,
                                  description)


@pytest.mark.parametrize("path, triton", [pytest.param("native", False, marks=needs_native("cross_attention"),
                                                       id="native"),
                                          pytest.param("python body", False, id="python body-sdpa"),
                                          pytest.param("python body", True, id="python body-triton")])
def test_op_runs_what_only_the_function_refuses(path, triton, monkeypatch):
    """float64, a head dim outside the Triton kernel's and no queries: the public function refuses them, the op runs
    them on every path (the C++ kernel; the Python body through SDPA with the key mask, also where `use_triton` says
    the Triton kernel runs, as on CUDA: forced here, and nothing is launched) and agrees with the reference."""
    def launch(*args, **kwargs):
        raise AssertionError("the Triton kernel was launched")

    monkeypatch.setattr(xattn, "use_triton", lambda op, *tensors: triton)
    monkeypatch.setattr(xattn, "_launch", launch)
    op = torch.ops.ditengine.cross_attention if path == "native" else python_body
    q, kv, kv_lens = make_inputs(3, 10, 2, 16, 9, [2, 9, 5], torch.float64, seed=8)
    torch.testing.assert_close(op(q, kv, kv_lens, 0.25), cross_attention_ref(q, kv, kv_lens, 0.25))
    q, kv, kv_lens = make_inputs(2, 10, 2, 12, 9, [2, 9], torch.float32, seed=9)  # head dim 12
    torch.testing.assert_close(op(q, kv, kv_lens, 0.3), cross_attention_ref(q, kv, kv_lens, 0.3), rtol=1e-5,
                               atol=1e-5)
    out = op(q[:, :0], kv, kv_lens, 0.3)
    assert out.shape == (2, 0, 2, 12), out.shape


def test_backend_and_config_errors_name_the_argument():
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32)
    with pytest.raises(ValueError, match="backend: expected one of"):
        cross_attention(q, kv, kv_lens, backend="cuda")
    with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                         "backend='triton', got backend=None"):
        cross_attention(q, kv, kv_lens, config=AUTOTUNE_CONFIGS[0])
    with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                         "backend='triton', got backend='reference'"):
        cross_attention(q, kv, kv_lens, backend="reference", config=AUTOTUNE_CONFIGS[0])
    if interpreting():  # else backend='triton' itself is refused on CPU tensors
        with pytest.raises(ValueError, match="config: BLOCK_N must be a power of two >= 16, got 48"):
            cross_attention(q, kv, kv_lens, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=48))


# -- the Triton kernel only ----------------------------------------------------------------------------------------
@triton_cpu
def test_triton_runs_only_the_valid_key_blocks(monkeypatch):
    """The key loop stops at cdiv(len_b, BLOCK_N) blocks: counted as the interpreter's loads of a k tile,
    shaped (Dh, BLOCK_N), one per key block. Lengths 1, one block exactly, one past it, and the full L."""
    from triton.runtime.interpreter import InterpreterBuilder

    k_tiles = []
    load = InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, *args, **kwargs):
        k_tiles.append(tuple(ptrs.data.shape) == (64, 32))
        return load(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    q, kv, kv_lens = make_inputs(4, 32, 1, 64, 300, [1, 32, 33, 300], torch.float32, seed=1)  # one query tile
    out = cross_attention(q, kv, kv_lens, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=32))
    assert sum(k_tiles) == 1 + 1 + 2 + 10, sum(k_tiles)
    check(out, q, kv, kv_lens, "block counts")


# -- the native CPU kernel only (csrc/cross_attention.cpp) ---------------------------------------------------------
native = needs_native("cross_attention")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_is_the_default_on_cpu(dtype, monkeypatch):
    """With the extension built, `cross_attention` on CPU tensors is the C++ kernel and nothing else: neither
    the op's Python body (SDPA) nor the reference runs, and no attention op of ATen shows in the profile, except
    ATen's flash attention inside the C++ kernel for bf16 on a CPU with AMX tiles (the kernel's own choice)."""
    assert choose("cross_attention", torch.device("cpu")) == "native"
    q, kv, kv_lens = make_inputs(2, 40, 2, 72, 30, [9, 1], dtype, seed=5)
    expected = torch.ops.ditengine.cross_attention(q, kv, kv_lens, 72 ** -0.5)

    def fail(*args, **kwargs):
        raise AssertionError("the Python implementation ran")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fail)
    monkeypatch.setattr(xattn, "cross_attention_ref", fail)
    with torch.profiler.profile() as prof:
        out = cross_attention(q, kv, kv_lens)
    names = {e.name for e in prof.events()}
    assert "ditengine::cross_attention" in names, names
    flash = dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    allowed = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu") \
        if flash else ()
    assert not [n for n in names if any(w in n for w in ("attention", "softmax", "einsum", "bmm", "masked"))
                and not n.startswith("ditengine::") and n not in allowed], names
    assert torch.equal(out, expected)
    assert torch.equal(cross_attention(q, kv, kv_lens, backend="native"), expected)


@native
def test_native_float64_runs_sdpa():
    """float64, which the public function refuses, reaches the op's CPU kernel in a direct call: SDPA with the mask,
    as the op's Python body."""
    q, kv, kv_lens = make_inputs(3, 10, 2, 16, 9, [2, 9, 5], torch.float64, seed=8)
    out64 = torch.ops.ditengine.cross_attention(q, kv, kv_lens, 0.25)
    assert out64.dtype == torch.float64 and out64.is_contiguous()
    torch.testing.assert_close(out64, cross_attention_ref(q, kv, kv_lens, 0.25))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], dtype)
    torch.library.opcheck(torch.ops.ditengine.cross_attention, (q, kv, kv_lens, 0.3))


# -- the public function, the op and its fake implementation ------------------------------------------------
def test_reference_backend_and_fake_implementation():
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32)
    assert torch.equal(cross_attention(q, kv, kv_lens, backend="reference"), cross_attention_ref(q, kv, kv_lens))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.ditengine.cross_attention(mode.from_tensor(q), mode.from_tensor(kv),
                                                   mode.from_tensor(kv_lens), 0.25)
    assert fake.shape == q.shape and fake.dtype == q.dtype and fake.is_contiguous()
    meta = torch.ops.ditengine.cross_attention(q.to("meta"), kv.to("meta"), kv_lens.to("meta"), 0.25)
    assert meta.shape == q.shape and meta.device.type == "meta"


@pytest.mark.parametrize("triton", [False, True], ids=["sdpa", "triton"])
def test_python_body_matches_reference(triton, monkeypatch):
    """The op's Python implementation, reached past the native CPU kernel: SDPA with a boolean key mask (the
    fallback, and the CPU path without the extension or the interpreter), or the Triton kernel where
    `use_triton` says so (CUDA; here the interpreter)."""
    if triton and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setattr(xattn, "use_triton", lambda op, *tensors: triton)
    q, kv, kv_lens = make_inputs(2, 11, 2, 72, 30, [30, 1], torch.float32, seed=10)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out = torch.ops.ditengine.cross_attention.default.redispatch(python_impl, q, kv, kv_lens, 72**-0.5)
    check(out, q, kv, kv_lens, f"python body ({'triton' if triton else 'sdpa'})")


def test_registered_op_passes_opcheck():
    q, kv, kv_lens = make_inputs(1, 4, 2, 16, 6, [4], torch.float32)
    torch.library.opcheck(torch.ops.ditengine.cross_attention, (q, kv, kv_lens, 0.25))


def test_triton_kernel_compiles_for_the_h100_without_a_gpu():
    """ptxas from Triton's wheel (as bench/sm90.py does for the other kernels): the GPU's pinned bf16 and fp32
    launches compile for sm_90, bf16 dots on warpgroup tensor cores, nothing spilled, shared memory fits."""
    out = run_python("""
        import json
        from ditengine.bench.sm90 import SHARED_LIMIT, attention_case, resources
        rows = []
        for dtype in ("bf16", "fp32"):
            kernel = attention_case(dtype, 72, key_lens=True)
            rows.append(dict(dtype=dtype, limit=SHARED_LIMIT, **resources(kernel)))
        print(json.dumps(rows))
    """, TRITON_INTERPRET="0")
    rows = json.loads(out.strip().splitlines()[-1])
    for row in rows:
        assert row["local_bytes"] == 0 and row["shared_bytes"] <= row["limit"], row
    assert [row["wgmma"] for row in rows] == [True, False], rows


# -- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Tq, L, lens", [(4096, 300, [20, 1]), (1024, 120, [120, 57]), (97, 300, [300, 1])])
def test_gpu_pixart_shapes(Tq, L, lens, dtype):
    q, kv, kv_lens = make_inputs(2, Tq, 16, 72, L, lens, dtype, "cuda", seed=Tq)
    assert choose("cross_attention", q.device) == "triton"
    check(cross_attention(q, kv, kv_lens), q, kv, kv_lens, f"cuda Tq={Tq} L={L} lens={lens}")
    for value in (float("nan"), 6e4):  # the padding is never read
        assert torch.equal(cross_attention(q, poison_padding(kv, kv_lens, value), kv_lens),
                           cross_attention(q, kv, kv_lens))


@pytest.mark.gpu
@pytest.mark.parametrize("B, Tq, H, Dh, L, lens", [(2, 97, 2, 64, 7, [3, 7]), (3, 257, 2, 72, 300, [300, 21, 1])])
def test_gpu_odd_shapes_fp32(B, Tq, H, Dh, L, lens):
    q, kv, kv_lens = make_inputs(B, Tq, H, Dh, L, lens, torch.float32, "cuda")
    check(cross_attention(q, kv, kv_lens), q, kv, kv_lens, f"cuda fp32 Tq={Tq} L={L}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS,
                         ids=lambda c: "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_gpu_every_autotune_config(config):
    q, kv, kv_lens = make_inputs(2, 1024, 16, 72, 300, [20, 1], torch.bfloat16, "cuda")
    check(cross_attention(q, kv, kv_lens, backend="triton", config=config), q, kv, kv_lens, f"config {config}")
