import re
from types import SimpleNamespace
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import (_native, adaln_modulate, adaln_modulate_ref, gated_residual_adaln,
                               gated_residual_adaln_ref)
from ditengine.kernels.adaln import MAX_D

from support.backends import cpu_backends
from support.native_helpers import isa_runner, requires_native, skip_unless_cpu_runs
from support.tolerance import assert_within_tolerance, fp32_floor


# (B, T, D): DiT widths (384, 768, 1024, 1152), odd widths (59, 341), T = 1, 97, 256, B = 1 and 3;
# kept small for Triton's interpreter (about 5 ms per row on a CPU).
SHAPES = [(1, 1, 384), (3, 1, 1152), (1, 16, 768), (1, 16, 1024), (2, 16, 1152), (1, 256, 59), (3, 97, 341)]
CPU_DTYPES = [torch.float32, torch.float16]  # bf16 is wrong in the interpreter: GPU only (docs/design.md section 6)
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(B, T, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, device=device).to(dtype)
    o = torch.randn(B, T, D, generator=g, device=device).to(dtype)
    modulation = torch.randn(B, 6 * D, generator=g, device=device).to(dtype)  # as the adaLN linear emits it
    return x, o, modulation.chunk(6, dim=1)  # strided (B, D) views, row stride 6D


def make_weight(D, dtype, device="cpu", seed=0):
    """A learned norm weight (D,): random around 1, as trained RMSNorm weights are, never 0."""
    g = torch.Generator(device).manual_seed(seed + 7)
    return (1 + 0.5 * torch.randn(D, generator=g, device=device)).to(dtype)


# The norm forms beside the default (LayerNorm, no weight): (rms, weighted).
NORMS = [(True, True), (True, False), (False, True)]
NORM_IDS = ["rms+weight", "rms", "layer+weight"]


def check_adaln(B, T, D, dtype, device="cpu", backend=None, seed=0, rms=False, weighted=False):
    x, _, (shift, scale, *_) = make_inputs(B, T, D, dtype, device, seed)
    w = make_weight(D, dtype, device, seed) if weighted else None
    out = adaln_modulate(x, shift, scale, backend=backend, rms=rms, weight=w)
    assert out.dtype == dtype and out.shape == (B, T, D)
    w32 = None if w is None else w.float()
    ref32 = adaln_modulate_ref(x.float(), shift.float(), scale.float(), rms=rms, weight=w32)
    ref_lp = adaln_modulate_ref(x, shift, scale, upcast=False, rms=rms, weight=w)
    assert_within_tolerance(out, ref32, ref_lp, FLOOR[dtype], "adaln_modulate")


def check_gated(B, T, D, dtype, device="cpu", backend=None, seed=0, inplace=False, rms=False, weighted=False):
    x, o, (_, _, gate, shift, scale, _) = make_inputs(B, T, D, dtype, device, seed)
    w = make_weight(D, dtype, device, seed) if weighted else None
    x_in = x.clone() if inplace else x
    x_new, y = gated_residual_adaln(x_in, gate, o, shift, scale, inplace=inplace, backend=backend, rms=rms, weight=w)
    assert x_new is x_in or not inplace
    w32 = None if w is None else w.float()
    ref_x32, ref_y32 = gated_residual_adaln_ref(x.float(), gate.float(), o.float(), shift.float(), scale.float(),
                                                rms=rms, weight=w32)
    lp_x, lp_y = gated_residual_adaln_ref(x, gate, o, shift, scale, upcast=False, rms=rms, weight=w)
    assert x_new.dtype == dtype and y.dtype == dtype
    assert_within_tolerance(x_new, ref_x32, lp_x, FLOOR[dtype], "x_new")
    assert_within_tolerance(y, ref_y32, lp_y, FLOOR[dtype], "y")


def _case_id(value) -> str:
    return str(value).removeprefix("torch.")


def backend_cases(op: str, cases: list, **own: list) -> list:
    """pytest params (backend, *case): each backend of cpu_backends(op) with every case of `cases` (tuples of the
    test's other parameters), or with its own list where one is given (`triton=[...]`; each use says why),
    keeping the backend's skip where it cannot run here."""
    unknown = set(own) - {"native", "triton", "reference"}
    assert not unknown, f"not a backend: {unknown}"
    params = []
    for backend_param in cpu_backends(op):
        backend, = backend_param.values
        for case in own.get(backend, cases):
            params.append(pytest.param(backend, *case, marks=backend_param.marks,
                                       id="-".join([backend, *map(_case_id, case)])))
    return params


# -- each backend against the reference ----------------------------------------------------------------------
# Every backend runs SHAPES in fp32 and fp16. The native kernel also runs every shape below in fp32 and bf16 (bf16
# is wrong in the interpreter; T = 256 rows over 24 shapes would take the interpreter minutes).
SMALL_CASES = [(*shape, dtype) for dtype in CPU_DTYPES for shape in SHAPES]
NATIVE_CASES = [(B, T, D, dtype) for dtype in (torch.float32, torch.bfloat16) for B in (1, 2) for T in (1, 97, 256)
                for D in (384, 1152, 59, 341)] + [(2, 97, 341, torch.float16)]


@pytest.mark.parametrize("backend, B, T, D, dtype",
                         backend_cases("adaln_modulate", SMALL_CASES,
                                       native=list(dict.fromkeys(SMALL_CASES + NATIVE_CASES))))
def test_matches_reference(backend, B, T, D, dtype):
    seed = B * 1000 + T * 10 + D  # fresh inputs per shape
    check_adaln(B, T, D, dtype, backend=backend, seed=seed)
    check_gated(B, T, D, dtype, backend=backend, seed=seed)
    if backend != "triton":  # the interpreter (about 10 ms a row) runs K3 in place in the short tests below
        check_gated(B, T, D, dtype, backend=backend, seed=seed, inplace=True)


# -- RMSNorm and the norm's learned weight (ACE-Step 1.5: y = RMSNorm_w(x) * (1 + scale) + shift) ------------
def max_relative_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_rms_reference_is_diffusers_rmsnorm_then_modulation():
    """The reference against the exact eager computation of ACE-Step 1.5's blocks, in fp32."""
    normalization = pytest.importorskip("diffusers.models.normalization")
    B, T, D = 2, 37, 341
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, torch.float32, seed=21)
    norm = normalization.RMSNorm(D, eps=1e-6)  # elementwise_affine: a learned weight, as in the model
    weight = make_weight(D, torch.float32, seed=21)
    with torch.no_grad():
        norm.weight.copy_(weight)
        want_k1 = norm(x) * (1 + scale[:, None]) + shift[:, None]
        x_new = x + gate[:, None] * o
        want_k3 = norm(x_new) * (1 + scale[:, None]) + shift[:, None]
    got_k1 = adaln_modulate_ref(x, shift, scale, eps=1e-6, rms=True, weight=weight)
    got_x, got_k3 = gated_residual_adaln_ref(x, gate, o, shift, scale, eps=1e-6, rms=True, weight=weight)
    assert max_relative_error(got_k1, want_k1) <= 1e-5
    assert torch.equal(got_x, x_new)
    assert max_relative_error(got_k3, want_k3) <= 1e-5
    # Without a weight: diffusers' RMSNorm(elementwise_affine=False).
    plain = normalization.RMSNorm(D, eps=1e-6, elementwise_affine=False)
    want = plain(x) * (1 + scale[:, None]) + shift[:, None]
    assert max_relative_error(adaln_modulate_ref(x, shift, scale, rms=True), want) <= 1e-5


def test_layernorm_reference_with_weight_is_torch_layer_norm():
    x, _, (shift, scale, *_) = make_inputs(2, 9, 96, torch.float32, seed=22)
    weight = make_weight(96, torch.float32, seed=22)
    want = F.layer_norm(x, (96,), weight=weight, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert max_relative_error(adaln_modulate_ref(x, shift, scale, weight=weight), want) <= 1e-5


# Odd D and odd T among them; small for the interpreter. bf16 runs in the interpreter here too: the kernel widens
# every load to fp32 explicitly, which is what the interpreter needs (docs/design.md section 6), and the bf16
# bound covers its truncating store. The native kernel runs its own list: ACE-Step 1.5's width (2048) and its 30 s
# token count (375) beside odd shapes, fp32 and bf16, and fp16 at one shape.
NORM_CASES = [(*shape, dtype) for dtype in (torch.float32, torch.bfloat16)
              for shape in ((1, 1, 384), (2, 16, 1152), (3, 37, 341), (1, 33, 59))]
NATIVE_NORM_CASES = [(B, T, D, dtype) for dtype in (torch.float32, torch.bfloat16) for B, T, D in
                     ((1, 1, 384), (2, 97, 59), (2, 97, 341), (2, 375, 2048))] + [(2, 97, 341, torch.float16)]


@pytest.mark.parametrize("rms, weighted", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("backend, B, T, D, dtype",
                         backend_cases("adaln_modulate", NORM_CASES, native=NATIVE_NORM_CASES))
def test_norm_forms_match_reference(backend, B, T, D, dtype, rms, weighted):
    seed = B * 1000 + T * 10 + D + 1
    check_adaln(B, T, D, dtype, backend=backend, seed=seed, rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, backend=backend, seed=seed, rms=rms, weighted=weighted)
    if backend != "triton":  # as in test_matches_reference
        check_gated(B, T, D, dtype, backend=backend, seed=seed, inplace=True, rms=rms, weighted=weighted)


@pytest.mark.parametrize("rms, weighted", [(False, False), *NORMS], ids=["layer", *NORM_IDS])
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_rows_of_a_precomputed_modulation_table_and_strided_x(backend, rms, weighted):
    S, B, depth, T, D = 3, 2, 4, 7, 67
    g = torch.Generator().manual_seed(23)
    table = torch.randn(S, B, depth, 6, D, generator=g)  # (steps, B, depth, 6, D), as FastSampler holds it
    shift, scale, gate = table[2, :, 1, 3], table[2, :, 1, 4], table[2, :, 1, 5]  # (B, D), row stride depth*6*D
    assert shift.stride(0) == depth * 6 * D
    x = torch.randn(B, 2 * T, D, generator=g)[:, ::2]  # strided tokens, contiguous last dim
    o = torch.randn(B, T, D, generator=g)
    weight = make_weight(D, torch.float32, seed=23) if weighted else None
    ref = adaln_modulate_ref(x, shift, scale, rms=rms, weight=weight)
    assert_within_tolerance(adaln_modulate(x, shift, scale, backend=backend, rms=rms, weight=weight), ref, ref,
                            FLOOR[torch.float32], "y")
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale, rms=rms, weight=weight)
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend=backend, rms=rms, weight=weight)
    torch.testing.assert_close(x_new, ref_x)  # within FMA contraction of x + gate * o
    assert_within_tolerance(y, ref_y, ref_y, FLOOR[torch.float32], "y")


def check_rms_fp32_residual(backend, y_dtype, weight_dtype, device="cpu"):
    """ACE-Step's K3 with the residual stream held in fp32 and the branch output and y in `y_dtype`, in place."""
    B, T, D = 2, 37, 341
    x, o, (_, _, gate, shift, scale, _) = make_inputs(B, T, D, torch.float32, device, seed=24)
    o_lp = o.to(y_dtype)
    gate, shift, scale = (m.to(y_dtype) for m in (gate, shift, scale))
    weight = make_weight(D, weight_dtype, device, seed=24)
    residual = x.clone()
    x_new, y = gated_residual_adaln(residual, gate, o_lp, shift, scale, inplace=True, backend=backend, rms=True,
                                    weight=weight)
    assert x_new is residual and x_new.dtype == torch.float32 and y.dtype == y_dtype
    # x_new: one fp32 multiply-add; y from x_new as stored, in fp64 (ref_hi) and as the fp32 reference with a
    # low-precision output (ref_lp): the one low-precision step is rounding y.
    hi_x = x.double() + gate.double()[:, None] * o_lp.double()
    lp_x = x + gate.float()[:, None] * o_lp.float()
    assert_within_tolerance(x_new, hi_x, lp_x, fp32_floor(hi_x), "x_new")
    hi_y = adaln_modulate_ref(x_new.double(), shift.double(), scale.double(), upcast=False, rms=True,
                              weight=weight.double())
    lp_y = adaln_modulate_ref(x_new, shift, scale, out_dtype=y_dtype, rms=True, weight=weight)
    assert_within_tolerance(y, hi_y, lp_y, fp32_floor(hi_y), "y")


# The interpreter stores fp32 -> bf16 by truncation (docs/design.md section 6), up to twice the rounding error this
# test allows: it runs the fp16 output; bf16 runs natively here and in the Triton kernel on a GPU.
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, y_dtype",
                         backend_cases("gated_residual_adaln_", [(torch.bfloat16,)], triton=[(torch.float16,)]))
def test_rms_inplace_fp32_residual_with_low_precision_output(backend, y_dtype, weight_dtype):
    check_rms_fp32_residual(backend, y_dtype, weight_dtype)


@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln"))
def test_rms_prenorm_without_modulation(backend):
    """The cross-attention pre-norm: K3 with a unit gate and zero shift and scale rows (stride-0 rows of one
    constant vector) is x_new = x + o and y = RMSNorm_w(x_new)."""
    B, T, D = 2, 19, 200
    x, o, _ = make_inputs(B, T, D, torch.float32, seed=25)
    weight = make_weight(D, torch.float32, seed=25)
    ones, zeros = torch.ones(D).expand(B, D), torch.zeros(D).expand(B, D)  # (B, D), row stride 0
    x_new, y = gated_residual_adaln(x, ones, o, zeros, zeros, backend=backend, rms=True, weight=weight)
    want_x = x + o
    want_y = want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(x_new, want_x, rtol=0, atol=0)
    assert max_relative_error(y, want_y) <= 1e-5


@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln_"))
def test_inplace_and_fp32_residual_with_half_output(backend):
    x, o, (_, _, gate, shift, scale, _) = make_inputs(2, 9, 96, torch.float32)
    o16 = o.half()
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o16, shift, scale)
    residual = x.clone()
    x_new, y = gated_residual_adaln(residual, gate, o16, shift, scale, inplace=True, backend=backend)
    assert x_new is residual and x_new.dtype == torch.float32 and y.dtype == torch.float16
    torch.testing.assert_close(residual, ref_x)
    torch.testing.assert_close(y, ref_y)
    x16 = x.half()
    y32 = adaln_modulate(x16, shift, scale, out_dtype=torch.float32, backend=backend)
    assert y32.dtype == torch.float32
    # fp32 math and output from fp16 inputs: as close to the fp64 reference as torch's own fp32 is.
    ref_hi = adaln_modulate_ref(x16.double(), shift.double(), scale.double(), upcast=False)
    ref_lp = adaln_modulate_ref(x16, shift, scale, out_dtype=torch.float32)
    assert_within_tolerance(y32, ref_hi, ref_lp, fp32_floor(ref_hi), "fp32 y from fp16 x")


# -- NaN and Inf, determinism -----------------------------------------------------------------------------------
# A short row count on every backend; the native kernel and the reference also run 97 tokens of an odd width in
# fp32 and bf16 (the interpreter: about 10 ms a row, and fp32 / fp16 only).
NAN_CASES = [(2, 6, 64, torch.float32)]
LONG_NAN_CASES = [(2, 97, 341, torch.float32), (2, 97, 341, torch.bfloat16)]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend, B, T, D, dtype",
                         backend_cases("gated_residual_adaln", NAN_CASES + LONG_NAN_CASES, triton=NAN_CASES))
def test_nan_and_inf_stay_in_their_row(backend, B, T, D, dtype):
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, dtype, seed=B * T + D)
    x[0, 1, 5] = float("nan")
    x[1, 3, 0] = float("inf")
    o[1, T - 1, 7] = float("nan")  # K3 only
    bad = torch.zeros(B, T, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    y = adaln_modulate(x, shift, scale, backend=backend)
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 3]).all()
    assert torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y[~bad], adaln_modulate_ref(x, shift, scale)[~bad])
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend=backend)
    # x_new is element-wise: each NaN and the Inf stay in their element, every other element is x + gate * o.
    nan, inf = torch.zeros_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool)
    nan[0, 1, 5] = nan[1, T - 1, 7] = inf[1, 3, 0] = True
    assert torch.equal(torch.isnan(x_new), nan), f"x_new is NaN at {torch.isnan(x_new).nonzero().tolist()}"
    assert torch.equal(torch.isposinf(x_new), inf), f"x_new is +Inf at {torch.isposinf(x_new).nonzero().tolist()}"
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale)
    torch.testing.assert_close(x_new, ref_x, equal_nan=True)
    # y normalises whole rows: the rows with a NaN or an Inf in x_new are NaN, the others match the reference.
    bad[1, T - 1] = True
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y[~bad], ref_y[~bad])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no weight"])
@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln"))
def test_rms_nan_and_inf_stay_in_their_row(backend, weighted):
    """RMSNorm has no mean: a NaN makes its row NaN, an Inf makes its element NaN and the row's finite
    elements `shift` (x * rsqrt(inf) = 0), as the eager reference does; every other row is untouched."""
    x, o, (shift, scale, gate, *_) = make_inputs(2, 6, 64, torch.float32, seed=26)
    weight = make_weight(64, torch.float32, seed=26) if weighted else None
    x[0, 1, 5] = float("nan")
    x[1, 3, 0] = float("inf")
    o[1, 4, 9] = float("nan")
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    y = adaln_modulate(x, shift, scale, backend=backend, rms=True, weight=weight)
    ref = adaln_modulate_ref(x, shift, scale, rms=True, weight=weight)
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 3, 0])
    torch.testing.assert_close(y[1, 3, 1:], shift[1, 1:])
    assert torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y, ref, equal_nan=True)
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend=backend, rms=True, weight=weight)
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, weight=weight)
    torch.testing.assert_close(x_new, ref_x, equal_nan=True)
    bad[1, 4] = True
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 4]).all() and torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y, ref_y, equal_nan=True)


# The native kernel spreads rows over threads: a shape of many rows, fp32 and bf16. The interpreter runs a short
# one in fp32.
@pytest.mark.parametrize("backend, B, T, D, dtype",
                         backend_cases("gated_residual_adaln_", [(2, 256, 1152, torch.float32),
                                                                 (2, 256, 1152, torch.bfloat16)],
                                       triton=[(2, 8, 128, torch.float32)]))
def test_same_inputs_same_bits(backend, B, T, D, dtype):
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, dtype, seed=6)
    assert torch.equal(adaln_modulate(x, shift, scale, backend=backend),
                       adaln_modulate(x, shift, scale, backend=backend))
    a = gated_residual_adaln(x, gate, o, shift, scale, backend=backend)
    b = gated_residual_adaln(x, gate, o, shift, scale, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = gated_residual_adaln(x.clone(), gate, o, shift, scale, inplace=True, backend=backend)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


# -- RMSNorm at the edges: a zero row, rows of tiny norm, a large eps -------------------------------------------
# fp32 on every backend, against the reference in fp64 (ref32 of the rule) with the fp32 reference as ref_lp and a
# floor of a few fp32 roundings: the kernels' arithmetic is fp32, and only its rounding may differ.
def assert_rms_adaln_matches(y, x, shift, scale, weight, eps, name):
    hi = adaln_modulate_ref(x.double(), shift.double(), scale.double(), eps, upcast=False, rms=True,
                            weight=None if weight is None else weight.double())
    lp = adaln_modulate_ref(x, shift, scale, eps, rms=True, weight=weight)
    assert_within_tolerance(y, hi, lp, fp32_floor(hi), name)


def assert_residual_matches(x_new, x, gate, o):
    hi = x.double() + gate.double()[:, None] * o.double()
    assert_within_tolerance(x_new, hi, x + gate[:, None] * o, fp32_floor(hi), "x_new")


@pytest.mark.parametrize("weighted", [True, False], ids=["rms+weight", "rms"])
@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln_"))
def test_rms_zero_row_gives_exactly_shift(backend, weighted):
    """An all-zero row has mean(x^2) = 0: RMSNorm gives 0 * rsqrt(eps) = 0 there, and y is shift itself, to the
    bit; the other rows match the reference. In K3 the zero row is a residual that cancels, x = -gate * o, with
    the gate's row rounded to powers of two so that x + gate * o is exactly 0 with or without FMA contraction."""
    B, T, D = 2, 5, 200
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, torch.float32, seed=31)
    weight = make_weight(D, torch.float32, seed=31) if weighted else None
    zero = torch.zeros(D)
    x[1, 2] = 0.0
    y = adaln_modulate(x, shift, scale, backend=backend, rms=True, weight=weight)
    assert torch.equal(y[1, 2], shift[1]), f"max |y - shift| = {(y[1, 2] - shift[1]).abs().max():.3g}"
    assert_rms_adaln_matches(y, x, shift, scale, weight, 1e-6, "y")
    gate[1] = gate[1].sign() * gate[1].abs().log2().round().exp2()  # a strided view: the modulation's row
    x[1, 2] = -(gate[1] * o[1, 2])  # exact: times a power of two
    for inplace in (False, True):
        x_in = x.clone() if inplace else x
        x_new, y = gated_residual_adaln(x_in, gate, o, shift, scale, inplace=inplace, backend=backend, rms=True,
                                        weight=weight)
        assert torch.equal(x_new[1, 2], zero), f"x_new[1, 2] = {x_new[1, 2]}"
        assert torch.equal(y[1, 2], shift[1]), f"max |y - shift| = {(y[1, 2] - shift[1]).abs().max():.3g}"
        assert_residual_matches(x_new, x, gate, o)
        assert_rms_adaln_matches(y, x_new, shift, scale, weight, 1e-6, "y")  # from x_new as stored


@pytest.mark.parametrize("tiny", [1e-3, 1e-6, 1e-20])
@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln"))
def test_rms_rows_of_tiny_norm_match_reference(backend, tiny):
    """Every other token's row scaled by `tiny`: mean(x^2) about tiny^2, next to eps = 1e-6 (1e-3), far below it
    (1e-6) or with squares near fp32's smallest normal (1e-20), so rsqrt(mean(x^2) + eps) must add eps and both
    terms must be computed correctly. The other rows have norms about 1: each row has its own statistic."""
    B, T, D = 2, 6, 341
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, torch.float32, seed=32)
    weight = make_weight(D, torch.float32, seed=32)
    x[:, ::2] *= tiny
    o[:, ::2] *= tiny
    y = adaln_modulate(x, shift, scale, backend=backend, rms=True, weight=weight)
    assert_rms_adaln_matches(y, x, shift, scale, weight, 1e-6, "y")
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend=backend, rms=True, weight=weight)
    assert_residual_matches(x_new, x, gate, o)
    assert_rms_adaln_matches(y, x_new, shift, scale, weight, 1e-6, "y of K3")


@pytest.mark.parametrize("eps", [10.0, 1e3])
@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln"))
def test_rms_large_eps_matches_reference(backend, eps):
    """eps far above mean(x^2) (about 1 here) scales each row by about 1/sqrt(eps): a kernel that drops eps, or
    takes the default instead, is off by that factor."""
    B, T, D = 2, 6, 341
    x, o, (shift, scale, gate, *_) = make_inputs(B, T, D, torch.float32, seed=33)
    weight = make_weight(D, torch.float32, seed=33)
    y = adaln_modulate(x, shift, scale, eps=eps, backend=backend, rms=True, weight=weight)
    assert_rms_adaln_matches(y, x, shift, scale, weight, eps, "y")
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, eps=eps, backend=backend, rms=True, weight=weight)
    assert_residual_matches(x_new, x, gate, o)
    assert_rms_adaln_matches(y, x_new, shift, scale, weight, eps, "y of K3")


@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_any_finite_positive_eps_runs(backend):
    x, o, (shift, scale, gate, *_) = make_inputs(1, 2, 16, torch.float32)
    calls = [lambda eps: adaln_modulate(x, shift, scale, eps=eps, backend=backend),
             lambda eps: gated_residual_adaln(x, gate, o, shift, scale, eps=eps, backend=backend),
             lambda eps: gated_residual_adaln(x.clone(), gate, o, shift, scale, eps=eps, inplace=True, backend=backend)]
    for call in calls:
        call(1e-5)
    torch.testing.assert_close(calls[0](1e-2), adaln_modulate_ref(x, shift, scale, eps=1e-2))


# -- bad inputs: one table, every backend, the Python and the C++ checks side by side ---------------------------
# Each row is refused by the public functions (their Python checks, before any backend runs) and by the registered
# op as each backend reaches it: on "native" the op itself, whose CPU kernel checks in C++ (csrc/adaln.cpp,
# csrc/checks.h); on "triton" and "reference" the op's Python body (kernels/adaln.py), reached past the C++ kernel
# as on a CPU without the extension or on CUDA, running the interpreter or (TRITON_INTERPRET=0) the reference. The
# public functions and the op's Python body share one check (kernels/adaln.py `_check_inputs`). Every path must
# raise the row's exception type with a message that names the argument: the row's regex accepts the Python wording
# and the C++ one (which also names the op).
OP_TENSORS = {
    "adaln_modulate": ("x", "shift", "scale"),
    "gated_residual_adaln": ("x", "gate", "o", "shift", "scale"),
    "gated_residual_adaln_": ("x", "gate", "o", "shift", "scale"),
    "adaln_modulate_dual": ("x", "shift", "scale", "shift2", "scale2"),
    "gated_residual_adaln_dual_": ("x", "gate", "o", "shift", "scale", "shift2", "scale2"),
}
OP_SCALARS = ("eps", "out_dtype", "rms", "weight")  # after the tensors, in every op's schema
PYTHON_IMPL = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

# Where a path does not refuse a row's input (reported; test_known_gaps_in_the_checks runs these cells). PyTorch's
# dispatch, documented rather than fought: a direct op call with a meta tensor among CPU tensors never reaches the
# C++ kernel. (The op's Python body, asked past the dispatcher, refuses it.)
META = ("a meta tensor among CPU tensors dispatches the registered op to its fake (Meta) kernel, which returns an "
        "uninitialised CPU tensor: the C++ device check never runs")
# Where a path runs a row's input by design (test_op_runs_rows_wider_than_max_d): D's limit is the Triton kernel's.
NO_LIMIT = {"op:native": "the C++ kernel has no limit on D (csrc/adaln.cpp: a heap scratch row per task)",
            "op:reference": "the op's Python body checks D's limit where the Triton kernel runs; the reference has "
                            "none"}


class Bad(NamedTuple):
    what: str
    build: Callable  # the valid inputs (a SimpleNamespace) -> the arguments that replace theirs, by name
    exc: type
    match: str  # names the argument, in the Python and in the C++ wording
    op: object = None  # None: the registered op raises the same; or (exc, match) where its schema refuses the
    #                    input before either implementation runs; or a str saying why the op is not asked
    gaps: dict | None = None  # "public:<backend>" or "op:<backend>" -> why that path does not refuse the input
    runs: dict | None = None  # "op:<backend>" -> why that path runs the input by design (asserted elsewhere)


def named(arg: str) -> str:
    """The argument as a message begins: Python's `arg: ` (`second[i] (arg): ` for shift2 and scale2), C++'s
    `ditengine::<op>: arg: `."""
    return rf"(?:^|: |\] \(){re.escape(arg)}\)?: "


def shape(*dims: int) -> str:
    """A shape as Python prints it, (3, 32) or (33,), or as C++ does, [3, 32] or [33]."""
    return r"[(\[]" + ", ".join(map(str, dims)) + r",?[)\]]"


def bad_dtype(arg: str, python: str, cpp: str) -> str:
    return (named(arg) + r"expected dtype (?:in \['float32', 'float16', 'bfloat16'\]|float32, float16 or bfloat16), "
            rf"got (?:{python}|{cpp})$")


def on_meta(arg: str) -> str:
    return named(arg) + "(?:on meta, expected cpu|expected a CPU tensor, got one on meta)"


def bad_eps(eps: float, printed: str) -> Bad:
    return Bad(f"eps {eps!r}", lambda v: dict(eps=eps), ValueError,
               named("eps") + f"expected a finite number > 0, got {printed}$")


# The valid inputs: x, o (2, 4, 32); gate, shift, scale, shift2, scale2 (2, 32) strided rows; w (32,).
BAD_INPUTS = [
    Bad("x has 2 dims", lambda v: dict(x=v.x.reshape(8, 32)), ValueError,
        named("x") + r"expected 3 dimensions \(B, T, D\), got shape " + shape(8, 32)),
    Bad("x is a list", lambda v: dict(x=[1.0]), TypeError, named("x") + "expected a torch.Tensor, got list",
        op=(RuntimeError, r"Expected a value of type 'Tensor' for argument 'x'")),
    Bad("x is int64", lambda v: dict(x=v.x.long()), TypeError, bad_dtype("x", "int64", "Long")),
    Bad("x last dim strided", lambda v: dict(x=v.x.transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
        named("x") + r"the last dimension must be contiguous \(stride 1\)"),
    Bad("x wider than MAX_D", lambda v: dict(x=v.x.new_empty(2, 4, MAX_D + 1)), ValueError,
        named("x") + f"hidden size {MAX_D + 1} exceeds the kernel's limit {MAX_D}", runs=NO_LIMIT),
    Bad("shift has 3 rows", lambda v: dict(shift=torch.ones(3, 32)), ValueError,
        named("shift") + r"expected shape \(2, 32\) \(B, D\), got " + shape(3, 32)),
    Bad("scale is 31 wide", lambda v: dict(scale=v.scale[:, :31]), ValueError,
        named("scale") + r"expected shape \(2, 32\) \(B, D\), got " + shape(2, 31)),
    Bad("scale has 3 dims", lambda v: dict(scale=v.scale[:, None]), ValueError,
        named("scale") + r"expected shape \(2, 32\) \(B, D\), got " + shape(2, 1, 32)),
    Bad("shift last dim strided", lambda v: dict(shift=torch.ones(32, 2).t()), ValueError,
        named("shift") + r"the last dimension must be contiguous \(stride 1\)"),
    Bad("shift on meta", lambda v: dict(shift=v.shift.to("meta")), ValueError, on_meta("shift"),
        gaps={"op:native": META}),
    Bad("gate is 33 wide", lambda v: dict(gate=torch.ones(2, 33)), ValueError,
        named("gate") + r"expected shape \(2, 32\) \(B, D\), got " + shape(2, 33)),
    Bad("gate is float64", lambda v: dict(gate=v.gate.double()), TypeError, bad_dtype("gate", "float64", "Double")),
    Bad("gate on meta", lambda v: dict(gate=v.gate.to("meta")), ValueError, on_meta("gate"),
        gaps={"op:native": META}),
    Bad("o has 3 tokens", lambda v: dict(o=v.o[:, :3]), ValueError,
        named("o") + "expected shape " + shape(2, 4, 32) + r" \(B, T, D\)(?: like x)?, got " + shape(2, 3, 32)),
    Bad("o is int64", lambda v: dict(o=v.o.long()), TypeError, bad_dtype("o", "int64", "Long")),
    Bad("out_dtype is int32", lambda v: dict(out_dtype=torch.int32), TypeError,
        named("out_dtype") + "expected float32, float16 or bfloat16, got (?:int32|Int)$"),
    bad_eps(float("nan"), "nan"),
    bad_eps(float("inf"), "inf"),
    bad_eps(-1.0, r"-1(?:\.0)?"),
    bad_eps(-1e-6, "-1e-06"),
    bad_eps(0.0, r"0(?:\.0)?"),
    Bad("eps is a str", lambda v: dict(eps="1e-6"), TypeError, named("eps") + "expected a finite number > 0, got str",
        op=(RuntimeError, r"Expected a value of type 'float' for argument 'eps'")),
    Bad("weight is 33 long", lambda v: dict(rms=True, weight=make_weight(33, torch.float32)), ValueError,
        named("weight") + "expected shape " + shape(32) + r" \(D,\) like x's last dim, got " + shape(33)),
    Bad("weight is (1, 32)", lambda v: dict(weight=v.w[None]), ValueError,
        named("weight") + "expected shape " + shape(32) + r" \(D,\) like x's last dim, got " + shape(1, 32)),
    Bad("weight strided", lambda v: dict(rms=True, weight=make_weight(64, torch.float32)[::2]), ValueError,
        named("weight") + r"the last dimension must be contiguous \(stride 1\)"),
    Bad("weight on meta", lambda v: dict(rms=True, weight=v.w.to("meta")), ValueError, on_meta("weight"),
        gaps={"op:native": META}),
    Bad("weight is int64", lambda v: dict(rms=True, weight=v.w.long()), TypeError,
        bad_dtype("weight", "int64", "Long")),
    Bad("weight is a list", lambda v: dict(weight=[1.0] * 32), TypeError,
        named("weight") + "expected a torch.Tensor, got list",
        op=(RuntimeError, r"Expected a value of type 'Optional\[Tensor\]' for argument 'weight'")),
    Bad("rms is an int", lambda v: dict(rms=1), TypeError, named("rms") + "expected a bool, got int",
        op="the op's schema takes 1 as True"),
    Bad("second is a tensor", lambda v: dict(second=v.shift2), TypeError,
        r"^second: expected None or a \(shift2, scale2\) pair of \(B, D\) tensors, got Tensor$",
        op="the ops take shift2 and scale2 as two tensors"),
    Bad("second is a 1-tuple", lambda v: dict(second=(v.shift2,)), TypeError,
        r"^second: expected None or a \(shift2, scale2\) pair of \(B, D\) tensors, got tuple$",
        op="the ops take shift2 and scale2 as two tensors"),
    Bad("shift2 has 1 row", lambda v: dict(shift2=v.shift2[:1]), ValueError,
        named("shift2") + r"expected shape \(2, 32\) \(B, D\), got " + shape(1, 32)),
    Bad("scale2 is 31 wide", lambda v: dict(scale2=v.scale2[:, :31]), ValueError,
        named("scale2") + r"expected shape \(2, 32\) \(B, D\), got " + shape(2, 31)),
    Bad("scale2 is int64", lambda v: dict(scale2=v.scale2.long()), TypeError, bad_dtype("scale2", "int64", "Long")),
    Bad("shift2 on meta", lambda v: dict(shift2=v.shift2.to("meta")), ValueError, on_meta("shift2"),
        gaps={"op:native": META}),
]


def bad_calls(bad: Bad):
    """(op, arguments by name) for each op that takes the row's arguments, with fresh valid inputs for the rest."""
    for op, tensors in OP_TENSORS.items():
        x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 4, 32, torch.float32)
        args = dict(x=x, gate=gate, o=o, shift=shift, scale=scale, shift2=shift2, scale2=scale2, eps=1e-6,
                    out_dtype=torch.float32, rms=False, weight=None)
        replaced = bad.build(SimpleNamespace(**args, w=make_weight(32, torch.float32)))
        takes = {*tensors, *OP_SCALARS, *(("second",) if "shift2" in tensors else ())}
        if replaced.keys() <= takes:
            yield op, {**args, **replaced}


def call_public(op: str, args: dict, backend: str):
    kw = dict(eps=args["eps"], out_dtype=args["out_dtype"], backend=backend, rms=args["rms"], weight=args["weight"])
    if "shift2" in OP_TENSORS[op]:
        kw["second"] = args.get("second", (args["shift2"], args["scale2"]))
    if op.startswith("adaln_modulate"):
        return adaln_modulate(args["x"], args["shift"], args["scale"], **kw)
    return gated_residual_adaln(args["x"], args["gate"], args["o"], args["shift"], args["scale"],
                                inplace=op.endswith("_"), **kw)


def call_op(op: str, args: dict, backend: str):
    """The registered op as `backend` reaches it: its C++ CPU kernel, or its Python body (see above)."""
    packet = getattr(torch.ops.ditengine, op)
    values = [args[name] for name in (*OP_TENSORS[op], *OP_SCALARS)]
    if backend == "native":
        return packet(*values)
    return packet.default.redispatch(PYTHON_IMPL, *values)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.what)
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_bad_inputs_are_refused_naming_the_argument(backend, bad, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' Python body runs the reference
    calls = list(bad_calls(bad))
    assert calls, f"no op takes the arguments of {bad.what!r}"
    for op, args in calls:
        for path, call in (("public", call_public), ("op", call_op)):
            if f"{path}:{backend}" in (bad.gaps or {}) or (path == "op" and isinstance(bad.op, str)):
                continue  # not refused there: see the row
            if f"{path}:{backend}" in (bad.runs or {}):
                continue  # runs by design: see the row (test_op_runs_rows_wider_than_max_d runs it)
            exc, match = bad.op if path == "op" and bad.op is not None else (bad.exc, bad.match)
            with pytest.raises(exc, match=match) as raised:
                call(op, args, backend)
            if path == "op" and backend == "native" and bad.op is None:
                assert str(raised.value).startswith(f"ditengine::{op}: "), "the C++ message names the op"


@pytest.mark.parametrize("gap", [pytest.param(gap, marks=pytest.mark.xfail(strict=True, reason=gap), id=name)
                                 for name, gap in (("meta", META),)])
def test_known_gaps_in_the_checks(gap, monkeypatch):
    """The table's cells that are not refused today, asked as the others are: an xfail until each path checks its
    input (strict: a fix shows as XPASS, to be moved into the table). The interpreter is not asked: it would run
    its kernel on the unchecked tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' Python body runs the reference
    native = _native.serves("adaln_modulate")
    missed, asked = [], 0
    for bad in BAD_INPUTS:
        for where, reason in (bad.gaps or {}).items():
            path, backend = where.split(":")
            if reason != gap or backend == "triton" or (backend == "native" and not native):
                continue
            for op, args in bad_calls(bad):
                asked += 1
                try:
                    with pytest.raises(bad.exc, match=bad.match):
                        (call_public if path == "public" else call_op)(op, args, backend)
                except (Exception, pytest.fail.Exception) as e:  # what it raised instead, or that it did not raise
                    missed.append(f"{bad.what}, {op} ({where}): {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if not asked:
        pytest.skip("no path of this gap runs here")
    assert not missed, "not refused with an error naming the argument:\n" + "\n".join(missed)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_op_runs_rows_wider_than_max_d(backend, monkeypatch):
    """MAX_D is the Triton kernel's limit (one row per program): the public functions refuse a wider x on every
    backend (the table above), the op refuses it where its Python body runs the Triton kernel, and runs it where
    the C++ kernel (no limit: csrc/adaln.cpp) or the reference does, matching the reference."""
    if backend == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' Python body runs the reference
    D = MAX_D + 1
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(1, 2, D, torch.float32, seed=41)
    w = make_weight(D, torch.float32, seed=41)
    calls = {
        "adaln_modulate": (x, shift, scale, 1e-6, torch.float32, True, w),
        "gated_residual_adaln": (x, gate, o, shift, scale, 1e-6, torch.float32, True, w),
        "gated_residual_adaln_": (x.clone(), gate, o, shift, scale, 1e-6, torch.float32, True, w),
        "adaln_modulate_dual": (x, shift, scale, shift2, scale2, 1e-6, torch.float32, True, w),
        "gated_residual_adaln_dual_": (x.clone(), gate, o, shift, scale, shift2, scale2, 1e-6, torch.float32, True, w),
    }
    refs = {
        "adaln_modulate": lambda: adaln_modulate_ref(x, shift, scale, rms=True, weight=w),
        "gated_residual_adaln": lambda: gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, weight=w),
        "gated_residual_adaln_": lambda: gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, weight=w)[1],
        "adaln_modulate_dual": lambda: adaln_modulate_ref(x, shift, scale, rms=True, weight=w,
                                                          second=(shift2, scale2)),
        "gated_residual_adaln_dual_": lambda: gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, weight=w,
                                                                       second=(shift2, scale2))[1:],
    }
    for op, args in calls.items():
        with pytest.raises(ValueError, match=f"^x: hidden size {D} exceeds the kernel's limit {MAX_D}$"):
            call_public(op, dict(zip((*OP_TENSORS[op], *OP_SCALARS), args)), backend)
        packet = getattr(torch.ops.ditengine, op)
        if backend == "triton":
            with pytest.raises(ValueError, match=f"^x: hidden size {D} exceeds the kernel's limit {MAX_D}$"):
                packet.default.redispatch(PYTHON_IMPL, *args)
            continue
        out = packet(*args) if backend == "native" else packet.default.redispatch(PYTHON_IMPL, *args)
        torch.testing.assert_close(out, refs[op](), rtol=1e-5, atol=1e-5, msg=op)


def test_backend_argument_names_what_cannot_run():
    x, _, (shift, scale, *_) = make_inputs(2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="backend='native': the native kernels run on CPU tensors, got meta"):
        adaln_modulate(x.to("meta"), shift.to("meta"), scale.to("meta"), backend="native")
    with pytest.raises(ValueError, match="backend: expected one of"):
        adaln_modulate(x, shift, scale, backend="cuda")


def test_registered_ops_python_impl_runs_the_norm_forms():
    """Past the native CPU kernels, the ops' Python implementation (the CUDA path's) gives the reference."""
    x, o, (shift, scale, gate, *_) = make_inputs(2, 3, 40, torch.float32, seed=27)
    w = make_weight(40, torch.bfloat16, seed=27)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    ops = torch.ops.ditengine
    y = ops.adaln_modulate.default.redispatch(python_impl, x, shift, scale, 1e-6, torch.float32, True, w)
    torch.testing.assert_close(y, adaln_modulate_ref(x, shift, scale, rms=True, weight=w))
    x_new, y = ops.gated_residual_adaln.default.redispatch(python_impl, x, gate, o, shift, scale, 1e-6,
                                                           torch.float32, True, w)
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, weight=w)
    torch.testing.assert_close(x_new, ref_x)
    torch.testing.assert_close(y, ref_y)


def test_registered_ops_pass_opcheck():
    x, o, (shift, scale, gate, *_) = make_inputs(1, 3, 16, torch.float32)
    w = make_weight(16, torch.float32)
    for norm in ((), (False, None), (True, None), (True, w), (False, w)):  # () is the schema's defaults
        torch.library.opcheck(torch.ops.ditengine.adaln_modulate, (x, shift, scale, 1e-6, torch.float32, *norm))
        torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln,
                              (x, gate, o, shift, scale, 1e-6, torch.float32, *norm))
        torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln_,
                              (x.clone(), gate, o, shift, scale, 1e-6, torch.float32, *norm))


# -- SD3.5's second modulation: one norm, two (shift, scale) pairs ------------------------------------------
def check_second(B, T, D, dtype, device="cpu", backend=None, seed=0, gated=False, inplace=False, rms=False,
                 weighted=False):
    """The fused pair against the reference under the tolerance rule, and against two single-modulation calls
    of the same backend (the same row statistics: equal to the last bit but for FMA contraction)."""
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(B, T, D, dtype, device, seed)
    w = make_weight(D, dtype, device, seed) if weighted else None
    kw = dict(rms=rms, weight=w)
    if gated:
        x_in = x.clone() if inplace else x
        x_new, y, y2 = gated_residual_adaln(x_in, gate, o, shift, scale, inplace=inplace, backend=backend,
                                            second=(shift2, scale2), **kw)
        assert (x_new is x_in) == inplace and (inplace or torch.equal(x_in, x))
        refs = gated_residual_adaln_ref(*(t.float() for t in (x, gate, o, shift, scale)), rms=rms,
                                        weight=None if w is None else w.float(),
                                        second=(shift2.float(), scale2.float()))
        lps = gated_residual_adaln_ref(x, gate, o, shift, scale, upcast=False, second=(shift2, scale2), **kw)
        singles = gated_residual_adaln(x, gate, o, shift, scale, backend=backend, **kw)
        singles += (gated_residual_adaln(x, gate, o, shift2, scale2, backend=backend, **kw)[1],)
        outs = (x_new, y, y2)
    else:
        outs = adaln_modulate(x, shift, scale, backend=backend, second=(shift2, scale2), **kw)
        refs = adaln_modulate_ref(*(t.float() for t in (x, shift, scale)), rms=rms,
                                  weight=None if w is None else w.float(), second=(shift2.float(), scale2.float()))
        lps = adaln_modulate_ref(x, shift, scale, upcast=False, second=(shift2, scale2), **kw)
        singles = tuple(adaln_modulate(x, sh, sc, backend=backend, **kw)
                        for sh, sc in ((shift, scale), (shift2, scale2)))
    for name, out, ref32, lp, single in zip(("x_new", "y", "y2")[-len(outs):], outs, refs, lps, singles):
        assert out.dtype == dtype and out.shape == (B, T, D), name
        assert_within_tolerance(out, ref32, lp, FLOOR[dtype], name)
        torch.testing.assert_close(out, single, rtol=1e-5, atol=FLOOR[dtype], msg=name)


# Both forms of each: K1 and K3 (functional, in place), LayerNorm and weighted RMSNorm.
SECOND_FORMS = [(False, False), (True, False), (True, True)]
SECOND_IDS = ["K1", "K3", "K3 in place"]


# fp32 on every backend, LayerNorm and weighted RMSNorm; the native kernel also bf16 and fp16 at an odd shape
# (the interpreter stores bf16 by truncation, and runs 97-token rows slowly).
SECOND_CASES = [(*shape, torch.float32, norm) for shape in ((2, 16, 64), (1, 33, 59), (3, 5, 1152))
                for norm in ("layer", "rms+weight")]
NATIVE_SECOND_CASES = [(2, 97, 341, dtype, "rms+weight") for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("gated, inplace", SECOND_FORMS, ids=SECOND_IDS)
@pytest.mark.parametrize("backend, B, T, D, dtype, norm",
                         backend_cases("adaln_modulate_dual", SECOND_CASES, native=SECOND_CASES + NATIVE_SECOND_CASES))
def test_second_modulation_matches_reference(backend, B, T, D, dtype, norm, gated, inplace):
    check_second(B, T, D, dtype, backend=backend, gated=gated, inplace=inplace, rms=norm == "rms+weight",
                 weighted=norm == "rms+weight")


@pytest.mark.parametrize("backend", cpu_backends("gated_residual_adaln_dual_"))
def test_second_modulation_reads_strided_residual_rows(backend):
    """FastSD3's use: the image rows of a joint [image; text] residual, normed in place, y2 into a buffer."""
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 24, 64, torch.float32, seed=3)
    resid = x.clone()
    x_new, y, y2 = gated_residual_adaln(resid[:, :16], gate, o[:, :16], shift, scale, inplace=True,
                                        second=(shift2, scale2), backend=backend)
    ref_x, ref_y, ref_y2 = gated_residual_adaln_ref(x[:, :16], gate, o[:, :16], shift, scale, second=(shift2, scale2))
    torch.testing.assert_close(resid[:, :16], ref_x)
    assert torch.equal(resid[:, 16:], x[:, 16:])  # the text rows are not touched
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(y2, ref_y2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate_dual"))
def test_second_modulation_nan_stays_in_its_row(backend):
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 6, 64, torch.float32, seed=4)
    x[1, 2, 7] = float("nan")
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[1, 2] = True
    for outs in (adaln_modulate(x, shift, scale, second=(shift2, scale2), backend=backend),
                 gated_residual_adaln(x, gate, o, shift, scale, second=(shift2, scale2), backend=backend)[1:]):
        for y in outs:
            assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


def test_second_modulation_ops_pass_opcheck():
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 5, 48, torch.float32)
    w = make_weight(48, torch.float32)
    for norm in ((), (True, w)):
        torch.library.opcheck(torch.ops.ditengine.adaln_modulate_dual,
                              (x, shift, scale, shift2, scale2, 1e-6, torch.float32, *norm))
        for oo in (o, o.bfloat16()):
            torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln_dual_,
                                  (x.clone(), gate, oo, shift, scale, shift2, scale2, 1e-6, oo.dtype, *norm))


def test_second_modulation_python_impl_matches_reference():
    """Past the native CPU kernels, the dual ops' Python implementation (the CUDA path's) gives the reference."""
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 3, 40, torch.float32, seed=29)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    ops = torch.ops.ditengine
    y, y2 = ops.adaln_modulate_dual.default.redispatch(python_impl, x, shift, scale, shift2, scale2, 1e-6,
                                                      torch.float32)
    ref = adaln_modulate_ref(x, shift, scale, second=(shift2, scale2))
    torch.testing.assert_close((y, y2), ref)
    x_in = x.clone()
    y, y2 = ops.gated_residual_adaln_dual_.default.redispatch(python_impl, x_in, gate, o, shift, scale, shift2,
                                                             scale2, 1e-6, torch.float32, True)
    ref = gated_residual_adaln_ref(x, gate, o, shift, scale, rms=True, second=(shift2, scale2))
    torch.testing.assert_close((x_in, y, y2), ref)


# -- the native CPU kernels alone (csrc/adaln.cpp): their dtypes, dispatch and registration --------------------
@requires_native
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_native_weight_in_any_float_dtype(weight_dtype):
    x, o, (shift, scale, gate, *_) = make_inputs(2, 9, 341, torch.bfloat16, seed=28)
    w = make_weight(341, weight_dtype, seed=28)
    y = adaln_modulate(x, shift, scale, backend="native", rms=True, weight=w)
    # The kernel widens the weight to fp32 and rounds once, at the store: the fp32 reference rounded to bf16,
    # but for fp32 ties of the last bit.
    ref = adaln_modulate_ref(x, shift, scale, rms=True, weight=w)
    hi = adaln_modulate_ref(x.double(), shift.double(), scale.double(), upcast=False, rms=True, weight=w.double())
    assert_within_tolerance(y, hi, ref, fp32_floor(hi), "y")


@requires_native
def test_native_is_what_cpu_calls_dispatch_to():
    import ditengine.kernels._backend as backend
    for op in ("adaln_modulate", "gated_residual_adaln", "gated_residual_adaln_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ditengine::{op}", "CPU")
        assert backend.choose(op, torch.device("cpu")) == "native"
    x, o, (shift, scale, gate, *_) = make_inputs(1, 4, 32, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        adaln_modulate(x, shift, scale)
    names = {e.name for e in prof.events()}
    # The Python implementation would show LayerNorm; the C++ kernel runs as one op with no ATen calls inside.
    assert "ditengine::adaln_modulate" in names and "aten::layer_norm" not in names, names


@requires_native
@pytest.mark.parametrize("x_dtype, o_dtype, mod_dtype, y_dtype", [
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),  # fp32 residual stream, bf16 model
    (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),   # fp32 precomputed modulation table
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.bfloat16, torch.float16),
])
def test_native_mixed_dtypes(x_dtype, o_dtype, mod_dtype, y_dtype):
    B, T, D = 2, 97, 341
    x, o, mods = make_inputs(B, T, D, torch.float32, seed=11)
    x, o = x.to(x_dtype), o.to(o_dtype)
    shift, scale, gate = (m.to(mod_dtype) for m in mods[:3])
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, out_dtype=y_dtype, backend="native")
    assert x_new.dtype == x_dtype and y.dtype == y_dtype
    # The inputs are rounded already and the math is fp32, so the one low-precision step is storing the
    # outputs: ref_lp is the fp32 reference in the outputs' dtypes, ref_hi the same in fp64 (an fp32 y must
    # then be as close as torch's own fp32). y is checked from x_new as the kernel stored it.
    hi_x = x.double() + gate.double()[:, None] * o.double()
    lp_x = (x.float() + gate.float()[:, None] * o.float()).to(x_dtype)
    assert_within_tolerance(x_new, hi_x, lp_x, fp32_floor(hi_x), "x_new")
    hi_y = adaln_modulate_ref(x_new.double(), shift.double(), scale.double(), upcast=False)
    assert_within_tolerance(y, hi_y, adaln_modulate_ref(x_new, shift, scale, out_dtype=y_dtype), fp32_floor(hi_y), "y")
    y1 = adaln_modulate(x, shift, scale, out_dtype=y_dtype, backend="native")
    hi_y1 = adaln_modulate_ref(x.double(), shift.double(), scale.double(), upcast=False)
    assert_within_tolerance(y1, hi_y1, adaln_modulate_ref(x, shift, scale, out_dtype=y_dtype), fp32_floor(hi_y1),
                            "adaln_modulate y")


@requires_native
def test_native_bf16_output_rounds_like_torch():
    x, _, (shift, scale, *_) = make_inputs(2, 64, 384, torch.float32, seed=3)
    y32 = adaln_modulate(x, shift, scale, backend="native")
    y16 = adaln_modulate(x, shift, scale, out_dtype=torch.bfloat16, backend="native")
    assert torch.equal(y16, y32.to(torch.bfloat16))  # round to nearest even, as torch's conversion


@requires_native
def test_native_ops_pass_opcheck():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 5, 48, torch.float32)  # strided (B, D) modulation views
    xb, ob = x.bfloat16(), o.bfloat16()
    w = make_weight(48, torch.bfloat16)
    for norm in ((), (True, None), (True, w), (False, w)):
        for args in ((x, shift, scale, 1e-6, torch.float32), (xb, shift, scale, 1e-6, torch.bfloat16)):
            torch.library.opcheck(torch.ops.ditengine.adaln_modulate, (*args, *norm))
        for xx, oo in ((x, o), (x, ob), (xb, ob)):
            torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln,
                                  (xx, gate, oo, shift, scale, 1e-6, oo.dtype, *norm))
            torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln_,
                                  (xx.clone(), gate, oo, shift, scale, 1e-6, oo.dtype, *norm))


@requires_native
def test_native_ops_have_no_derivative():
    x, o, (shift, scale, gate, *_) = make_inputs(1, 3, 16, torch.float32)
    y = adaln_modulate(x.requires_grad_(), shift, scale, backend="native")
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()
    with torch.no_grad():
        assert not adaln_modulate(x, shift, scale, backend="native").requires_grad


@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    """isa -> the native outputs with DITENGINE_ISA=isa, computed once per ISA in a fresh interpreter, after
    checking that the extension ran that ISA (or, for one this CPU lacks, the best it has)."""
    code = """
        import torch
        from ditengine.kernels import adaln_modulate, gated_residual_adaln, _native
        g = torch.Generator().manual_seed(0)
        x, o = torch.randn(2, 97, 341, generator=g), torch.randn(2, 97, 341, generator=g)
        shift, scale, gate = torch.randn(2, 3 * 341, generator=g).chunk(3, dim=1)
        w = 1 + 0.5 * torch.randn(341, generator=g)
        outs = [_native.build_info()["isa"]]
        for dt in (torch.float32, torch.bfloat16):
            for norm in (dict(), dict(rms=True, weight=w), dict(rms=True), dict(weight=w.to(dt))):
                outs += [adaln_modulate(x.to(dt), shift, scale, backend="native", **norm),
                         *gated_residual_adaln(x.to(dt), gate, o.to(dt), shift, scale, backend="native", **norm)]
        torch.save(outs, "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@requires_native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_isa_variants_agree(isa, isa_variant):
    """Each vector variant against the scalar baseline: three different code paths on an AVX-512 CPU."""
    skip_unless_cpu_runs(isa)
    for a, b in zip(isa_variant(isa), isa_variant("baseline")):
        # fp32 arithmetic in the same order; only FMA contraction (absent from baseline) may differ.
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5 if a.dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if a.dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B, T, D", [(2, 256, 1152), (16, 256, 1152), (2, 1024, 1152), (3, 97, 341), (1, 1, 59),
                                     (2, 256, 384), (2, 256, 768), (2, 256, 1024)])
def test_gpu_matches_reference(B, T, D, dtype):
    check_adaln(B, T, D, dtype, "cuda")
    check_gated(B, T, D, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rms, weighted", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B, T, D", [(2, 375, 2048), (2, 3000, 2048), (3, 97, 341), (1, 1, 59)])
def test_gpu_norm_forms_match_reference(B, T, D, dtype, rms, weighted):
    check_adaln(B, T, D, dtype, "cuda", rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, "cuda", rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, "cuda", inplace=True, rms=rms, weighted=weighted)


@pytest.mark.gpu
@pytest.mark.parametrize("gated, inplace", SECOND_FORMS, ids=SECOND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B, T, D", [(2, 1024, 1536), (2, 4096, 1536), (3, 97, 341)])
def test_gpu_second_modulation_matches_reference(B, T, D, dtype, gated, inplace):
    check_second(B, T, D, dtype, "cuda", gated=gated, inplace=inplace, rms=True, weighted=True)
    check_second(B, T, D, dtype, "cuda", gated=gated, inplace=inplace)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_rms_inplace_fp32_residual_with_bf16_output(weight_dtype):
    check_rms_fp32_residual(None, torch.bfloat16, weight_dtype, "cuda")
