import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import (adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref)

from support.native_helpers import (isa_runner, needs_native, requires_native, skip_unless_cpu_runs,
                            triton_cpu)
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


@triton_cpu
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, T, D", SHAPES)
def test_adaln_modulate_matches_reference(B, T, D, dtype):
    check_adaln(B, T, D, dtype, backend="triton")


@triton_cpu
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, T, D", SHAPES)
def test_gated_residual_adaln_matches_reference(B, T, D, dtype):
    check_gated(B, T, D, dtype, backend="triton")


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


# Odd D and odd T among them; small for the interpreter. bf16 runs here too: the kernel widens every load to fp32
# explicitly, which is what the interpreter needs (docs/design.md section 6).
NORM_SHAPES = [(1, 1, 384), (2, 16, 1152), (3, 37, 341), (1, 33, 59)]


@triton_cpu
@pytest.mark.parametrize("rms, weighted", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, T, D", NORM_SHAPES)
def test_norm_forms_match_reference(B, T, D, dtype, rms, weighted):
    seed = B * 1000 + T * 10 + D
    check_adaln(B, T, D, dtype, backend="triton", seed=seed, rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, backend="triton", seed=seed, rms=rms, weighted=weighted)


# The native kernel where built (the default on CPU), the Triton kernel through the interpreter.
DEFAULT_AND_TRITON = [None, pytest.param("triton", marks=triton_cpu)]


@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
@pytest.mark.parametrize("rms, weighted", NORMS, ids=NORM_IDS)
def test_norm_forms_read_rows_of_a_precomputed_modulation_table(backend, rms, weighted):
    S, B, depth, T, D = 3, 2, 4, 7, 67
    g = torch.Generator().manual_seed(23)
    table = torch.randn(S, B, depth, 6, D, generator=g)  # (steps, B, depth, 6, D)
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
@pytest.mark.parametrize("backend, y_dtype", [
    pytest.param("native", torch.bfloat16, marks=needs_native("gated_residual_adaln_")),
    pytest.param("triton", torch.float16, marks=triton_cpu)], ids=["native-bf16", "triton-fp16"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_inplace_fp32_residual_with_low_precision_output(backend, y_dtype, weight_dtype):
    check_rms_fp32_residual(backend, y_dtype, weight_dtype)


@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
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


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no weight"])
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


def test_weight_and_rms_errors_name_the_argument():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 4, 32, torch.float32)
    w = make_weight(32, torch.float32)
    calls = [lambda **kw: adaln_modulate(x, shift, scale, **kw),
             lambda **kw: gated_residual_adaln(x, gate, o, shift, scale, **kw),
             lambda **kw: gated_residual_adaln(x.clone(), gate, o, shift, scale, inplace=True, **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=r"weight: expected shape \(32\) \(D,\) like x's last dim, got \(33,\)"):
            call(rms=True, weight=torch.randn(33))
        with pytest.raises(ValueError, match=r"weight: expected shape \(32\) \(D,\) like x's last dim, got \(1, 32\)"):
            call(weight=w[None])
        with pytest.raises(ValueError, match="weight: the last dimension must be contiguous"):
            call(rms=True, weight=torch.randn(64)[::2])
        with pytest.raises(ValueError, match="weight: on meta, expected cpu"):
            call(rms=True, weight=w.to("meta"))
        with pytest.raises(TypeError, match=r"weight: expected dtype in \['float32', 'float16', 'bfloat16'\], "
                                            r"got int64"):
            call(rms=True, weight=w.long())
        with pytest.raises(TypeError, match="weight: expected a torch.Tensor, got list"):
            call(weight=[1.0] * 32)
        with pytest.raises(TypeError, match="rms: expected a bool, got int"):
            call(rms=1)


def test_rows_of_a_precomputed_modulation_table_and_strided_x():
    S, B, depth, T, D = 3, 2, 4, 5, 64
    g = torch.Generator().manual_seed(1)
    table = torch.randn(S, B, depth, 6, D, generator=g)  # (steps, B, depth, 6, D), as FastSampler holds it
    shift, scale = table[1, :, 2, 0], table[1, :, 2, 1]  # (B, D), row stride depth*6*D
    assert shift.stride(0) == depth * 6 * D
    big = torch.randn(B, 2 * T, D, generator=g)
    x = big[:, ::2]  # non-contiguous token stride, contiguous last dim
    torch.testing.assert_close(adaln_modulate(x, shift, scale), adaln_modulate_ref(x, shift, scale))
    o = torch.randn(B, T, D, generator=g)
    gate = table[1, :, 2, 2]
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale)
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale)
    torch.testing.assert_close(x_new, ref_x)
    torch.testing.assert_close(y, ref_y)


# The default and the Triton kernel: each must keep its dtypes, values and NaN rows.
@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
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


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
def test_nan_and_inf_stay_in_their_row(backend):
    x, o, (shift, scale, gate, *_) = make_inputs(2, 6, 64, torch.float32)
    x[0, 1, 5] = float("nan")
    x[1, 3, 0] = float("inf")
    y = adaln_modulate(x, shift, scale, backend=backend)
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 3]).all()
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    assert torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y[~bad], adaln_modulate_ref(x, shift, scale)[~bad])
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend=backend)
    # x_new is element-wise: the NaN and the Inf stay in their element, every other element is x + gate * o.
    nan, inf = torch.zeros_like(x, dtype=torch.bool), torch.zeros_like(x, dtype=torch.bool)
    nan[0, 1, 5] = inf[1, 3, 0] = True
    assert torch.equal(torch.isnan(x_new), nan), f"x_new is NaN at {torch.isnan(x_new).nonzero().tolist()}"
    assert torch.equal(torch.isposinf(x_new), inf), f"x_new is +Inf at {torch.isposinf(x_new).nonzero().tolist()}"
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o, shift, scale)
    torch.testing.assert_close(x_new, ref_x, equal_nan=True)
    # y normalises whole rows: the two rows with a NaN or an Inf are NaN, the others match the reference.
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y[~bad], ref_y[~bad])


def test_same_inputs_same_bits():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 8, 128, torch.float32, seed=5)
    assert torch.equal(adaln_modulate(x, shift, scale), adaln_modulate(x, shift, scale))
    a, b = gated_residual_adaln(x, gate, o, shift, scale), gated_residual_adaln(x, gate, o, shift, scale)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors_name_the_argument():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 4, 32, torch.float32)
    with pytest.raises(ValueError, match=r"x: expected 3 dimensions \(B, T, D\), got shape \(8, 32\)"):
        adaln_modulate(x.reshape(8, 32), shift, scale)
    with pytest.raises(ValueError, match=r"shift: expected shape \(2, 32\) \(B, D\), got \(3, 32\)"):
        adaln_modulate(x, torch.randn(3, 32), scale)
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 32\)"):
        adaln_modulate(x, shift, torch.randn(2, 31))
    with pytest.raises(TypeError, match=r"x: expected dtype in \['float32', 'float16', 'bfloat16'\], got int64"):
        adaln_modulate(x.long(), shift, scale)
    with pytest.raises(ValueError, match="shift: the last dimension must be contiguous"):
        adaln_modulate(x, torch.randn(32, 2).t(), scale)
    with pytest.raises(ValueError, match="x: the last dimension must be contiguous"):
        adaln_modulate(x.transpose(1, 2).contiguous().transpose(1, 2), shift, scale)
    with pytest.raises(ValueError, match="gate: on meta, expected cpu"):
        gated_residual_adaln(x, gate.to("meta"), o, shift, scale)
    with pytest.raises(ValueError, match=r"o: expected shape \(2, 4, 32\) \(B, T, D\) like x"):
        gated_residual_adaln(x, gate, o[:, :3], shift, scale)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        adaln_modulate([1.0], shift, scale)


# Every backend that runs on CPU tensors; each skips only where it cannot run here.
CPU_BACKENDS = ["reference", pytest.param("triton", marks=triton_cpu),
                pytest.param("native", marks=needs_native("adaln_modulate"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps_must_be_a_finite_positive_number(backend):
    x, o, (shift, scale, gate, *_) = make_inputs(1, 2, 16, torch.float32)
    calls = [lambda eps: adaln_modulate(x, shift, scale, eps=eps, backend=backend),
             lambda eps: gated_residual_adaln(x, gate, o, shift, scale, eps=eps, backend=backend),
             lambda eps: gated_residual_adaln(x.clone(), gate, o, shift, scale, eps=eps, inplace=True, backend=backend)]
    for call in calls:
        for eps in (float("nan"), float("inf"), -1e-6, 0.0):
            with pytest.raises(ValueError, match=rf"eps: expected a finite number > 0, got {eps!r}"):
                call(eps)
        with pytest.raises(TypeError, match="eps: expected a finite number > 0, got str"):
            call("1e-6")
        call(1e-5)  # and a valid eps runs
    torch.testing.assert_close(calls[0](1e-2), adaln_modulate_ref(x, shift, scale, eps=1e-2))


def test_registered_ops_check_eps():
    """The ops' Python implementation (the CUDA path, and CPU without the extension) checks eps too,
    reached here past the native CPU kernels."""
    x, o, (shift, scale, gate, *_) = make_inputs(1, 2, 16, torch.float32)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    ops = torch.ops.ditengine
    for op, args in ((ops.adaln_modulate, (x, shift, scale)), (ops.gated_residual_adaln, (x, gate, o, shift, scale)),
                     (ops.gated_residual_adaln_, (x.clone(), gate, o, shift, scale))):
        with pytest.raises(ValueError, match="eps: expected a finite number > 0, got nan"):
            op.default.redispatch(python_impl, *args, float("nan"), torch.float32)
        with pytest.raises(ValueError, match=r"weight: expected shape \(16\)"):
            op.default.redispatch(python_impl, *args, 1e-6, torch.float32, True, torch.randn(15))


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


@pytest.mark.parametrize("backend", [None, "reference", pytest.param("triton", marks=triton_cpu)])
@pytest.mark.parametrize("gated, inplace", SECOND_FORMS, ids=SECOND_IDS)
@pytest.mark.parametrize("rms, weighted", [(False, False), (True, True)], ids=["layer", "rms+weight"])
@pytest.mark.parametrize("B, T, D", [(2, 16, 64), (1, 33, 59), (3, 5, 1152)])
def test_second_modulation_matches_reference(B, T, D, backend, gated, inplace, rms, weighted):
    check_second(B, T, D, torch.float32, backend=backend, gated=gated, inplace=inplace, rms=rms, weighted=weighted)


@requires_native
@pytest.mark.parametrize("gated, inplace", SECOND_FORMS, ids=SECOND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_second_modulation_in_low_precision(dtype, gated, inplace):
    check_second(2, 97, 341, dtype, backend="native", gated=gated, inplace=inplace, rms=True, weighted=True)


def test_second_modulation_reads_strided_residual_rows():
    """FastSD3's use: the image rows of a joint [image; text] residual, normed in place, y2 into a buffer."""
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 24, 64, torch.float32, seed=3)
    resid = x.clone()
    x_new, y, y2 = gated_residual_adaln(resid[:, :16], gate, o[:, :16], shift, scale, inplace=True,
                                        second=(shift2, scale2))
    ref_x, ref_y, ref_y2 = gated_residual_adaln_ref(x[:, :16], gate, o[:, :16], shift, scale, second=(shift2, scale2))
    torch.testing.assert_close(resid[:, :16], ref_x)
    assert torch.equal(resid[:, 16:], x[:, 16:])  # the text rows are not touched
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(y2, ref_y2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", DEFAULT_AND_TRITON)
def test_second_modulation_nan_stays_in_its_row(backend):
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 6, 64, torch.float32, seed=4)
    x[1, 2, 7] = float("nan")
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[1, 2] = True
    for outs in (adaln_modulate(x, shift, scale, second=(shift2, scale2), backend=backend),
                 gated_residual_adaln(x, gate, o, shift, scale, second=(shift2, scale2), backend=backend)[1:]):
        for y in outs:
            assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


def test_second_modulation_errors_name_the_argument():
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 4, 32, torch.float32)
    with pytest.raises(TypeError, match=r"second: expected None or a \(shift2, scale2\) pair of \(B, D\) tensors, "
                                        "got Tensor"):
        adaln_modulate(x, shift, scale, second=shift2)
    with pytest.raises(TypeError, match="second: expected None or a"):
        gated_residual_adaln(x, gate, o, shift, scale, second=(shift2,))
    with pytest.raises(ValueError, match=r"second\[1\] \(scale2\): expected shape \(2, 32\) \(B, D\), got \(2, 31\)"):
        adaln_modulate(x, shift, scale, second=(shift2, scale2[:, :31]))
    with pytest.raises(ValueError, match=r"second\[0\] \(shift2\): on meta, expected cpu"):
        gated_residual_adaln(x, gate, o, shift, scale, second=(shift2.to("meta"), scale2))


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


@requires_native
def test_native_second_modulation_errors_name_the_argument():
    x, o, (shift, scale, gate, shift2, scale2, _) = make_inputs(2, 4, 32, torch.float32)
    ops = torch.ops.ditengine
    with pytest.raises(ValueError, match=r"adaln_modulate_dual: shift2: expected shape \(2, 32\) \(B, D\)"):
        ops.adaln_modulate_dual(x, shift, scale, shift2[:1], scale2, 1e-6, torch.float32)
    with pytest.raises(TypeError, match="gated_residual_adaln_dual_: scale2: expected dtype float32, float16 or "
                                        "bfloat16, got Long"):
        ops.gated_residual_adaln_dual_(x, gate, o, shift, scale, shift2, scale2.long(), 1e-6, torch.float32)


# -- the native CPU kernels (csrc/adaln.cpp) -------------------------------------------------------------------
# Every shape in fp32 and bf16; fp16 (supported, not a speed target) at one odd shape.
NATIVE_CASES = [(B, T, D, dtype) for dtype in (torch.float32, torch.bfloat16) for B in (1, 2) for T in (1, 97, 256)
                for D in (384, 1152, 59, 341)] + [(2, 97, 341, torch.float16)]


@requires_native
@pytest.mark.parametrize("B, T, D, dtype", NATIVE_CASES, ids=str)
def test_native_matches_reference(B, T, D, dtype):
    seed = B * 1000 + T * 10 + D  # fresh inputs per shape
    check_adaln(B, T, D, dtype, backend="native", seed=seed)
    check_gated(B, T, D, dtype, backend="native", seed=seed)
    check_gated(B, T, D, dtype, backend="native", seed=seed, inplace=True)


# ACE-Step 1.5's width (2048) and its 30 s token count (375) beside odd shapes, fp32 and bf16; fp16 at one shape.
NATIVE_NORM_CASES = [(B, T, D, dtype) for dtype in (torch.float32, torch.bfloat16) for B, T, D in
                     ((1, 1, 384), (2, 97, 59), (2, 97, 341), (2, 375, 2048))] + [(2, 97, 341, torch.float16)]


@requires_native
@pytest.mark.parametrize("rms, weighted", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("B, T, D, dtype", NATIVE_NORM_CASES, ids=str)
def test_native_norm_forms_match_reference(B, T, D, dtype, rms, weighted):
    seed = B * 1000 + T * 10 + D + 1
    check_adaln(B, T, D, dtype, backend="native", seed=seed, rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, backend="native", seed=seed, rms=rms, weighted=weighted)
    check_gated(B, T, D, dtype, backend="native", seed=seed, inplace=True, rms=rms, weighted=weighted)


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
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_nan_and_inf_stay_in_their_row(dtype):
    x, o, (shift, scale, gate, *_) = make_inputs(2, 97, 341, dtype, seed=4)
    x[0, 1, 5] = float("nan")
    x[1, 3, 0] = float("inf")
    o[1, 50, 7] = float("nan")
    bad = torch.zeros(2, 97, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    y = adaln_modulate(x, shift, scale, backend="native")
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    bad[1, 50] = True
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale, backend="native")
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    assert torch.isnan(x_new[1, 50, 7]) and torch.isfinite(x_new[1, 50, :7]).all()


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    x, o, (shift, scale, gate, *_) = make_inputs(2, 256, 1152, dtype, seed=6)
    assert torch.equal(adaln_modulate(x, shift, scale, backend="native"),
                       adaln_modulate(x, shift, scale, backend="native"))
    a = gated_residual_adaln(x, gate, o, shift, scale, backend="native")
    b = gated_residual_adaln(x, gate, o, shift, scale, backend="native")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = gated_residual_adaln(x.clone(), gate, o, shift, scale, inplace=True, backend="native")
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


@requires_native
def test_native_errors_name_the_argument():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 4, 32, torch.float32)
    ops = torch.ops.ditengine
    f32 = torch.float32
    with pytest.raises(ValueError, match=r"adaln_modulate: x: expected 3 dimensions \(B, T, D\), got shape \[8, 32\]"):
        ops.adaln_modulate(x.reshape(8, 32), shift, scale, 1e-6, f32)
    with pytest.raises(ValueError, match=r"shift: expected shape \(2, 32\) \(B, D\), got \[3, 32\]"):
        ops.adaln_modulate(x, torch.randn(3, 32), scale, 1e-6, f32)
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 32\) \(B, D\), got \[2, 1, 32\]"):
        ops.adaln_modulate(x, shift, scale[:, None], 1e-6, f32)
    with pytest.raises(TypeError, match="x: expected dtype float32, float16 or bfloat16, got Long"):
        ops.adaln_modulate(x.long(), shift, scale, 1e-6, f32)
    with pytest.raises(TypeError, match="out_dtype: expected float32, float16 or bfloat16, got Int"):
        ops.adaln_modulate(x, shift, scale, 1e-6, torch.int32)
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got -1"):
        ops.adaln_modulate(x, shift, scale, -1.0, f32)
    with pytest.raises(ValueError, match="eps: expected a finite number > 0, got 0"):
        ops.adaln_modulate(x, shift, scale, 0.0, f32)
    with pytest.raises(ValueError, match="shift: the last dimension must be contiguous"):
        ops.adaln_modulate(x, torch.randn(32, 2).t(), scale, 1e-6, f32)
    with pytest.raises(ValueError, match="x: the last dimension must be contiguous"):
        ops.adaln_modulate(x.transpose(1, 2).contiguous().transpose(1, 2), shift, scale, 1e-6, f32)
    with pytest.raises(ValueError, match=r"gated_residual_adaln: o: expected shape \[2, 4, 32\] \(B, T, D\), "
                                         r"got \[2, 3, 32\]"):
        ops.gated_residual_adaln(x, gate, o[:, :3], shift, scale, 1e-6, f32)
    with pytest.raises(TypeError, match="gated_residual_adaln_: gate: expected dtype float32, float16 or bfloat16, "
                                        "got Double"):
        ops.gated_residual_adaln_(x, gate.double(), o, shift, scale, 1e-6, f32)
    w = make_weight(32, torch.float32)
    with pytest.raises(ValueError, match=r"adaln_modulate: weight: expected shape \(32,\) \(D,\) like x's last dim, "
                                         r"got \[33\]"):
        ops.adaln_modulate(x, shift, scale, 1e-6, f32, True, torch.randn(33))
    with pytest.raises(ValueError, match=r"gated_residual_adaln: weight: expected shape \(32,\) \(D,\) like x's "
                                         r"last dim, got \[1, 32\]"):
        ops.gated_residual_adaln(x, gate, o, shift, scale, 1e-6, f32, False, w[None])
    with pytest.raises(TypeError, match="gated_residual_adaln_: weight: expected dtype float32, float16 or bfloat16, "
                                        "got Long"):
        ops.gated_residual_adaln_(x, gate, o, shift, scale, 1e-6, f32, True, w.long())
    with pytest.raises(ValueError, match="weight: the last dimension must be contiguous"):
        ops.adaln_modulate(x, shift, scale, 1e-6, f32, True, torch.randn(64)[::2])
    with pytest.raises(ValueError, match="backend='native': the native kernels run on CPU tensors, got meta"):
        adaln_modulate(x.to("meta"), shift.to("meta"), scale.to("meta"), backend="native")
    with pytest.raises(ValueError, match="backend: expected one of"):
        adaln_modulate(x, shift, scale, backend="cuda")


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
