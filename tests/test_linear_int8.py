import math

import pytest
import torch
import torch.nn.functional as F

from ditengine.bench.metrics import sqnr_db
from ditengine.kernels import Int8Linear, linear_int8, prepack_int8
from ditengine.kernels.linear_int8 import QMAX, _linear_int8_torch, error_bound, quantize_rows

from support.backends import bad_input_table, cpu_backends
from support.native_helpers import isa_runner, needs_native, skip_unless_cpu_runs

native = needs_native("linear_int8")
# The int8 path's backends on CPU tensors: "native" runs the registered op (its C++ kernel), "reference" the op's
# torch body (`prepack_int8(native=False)`). It has no Triton kernel.
BACKENDS = cpu_backends("linear_int8", ("native", "reference"))
GELU_SLOPE = 1.13  # the largest |d/dy gelu_tanh(y)|: the GELU widens an input error by at most this


def layer(M, K, N, dtype=torch.float32, seed=0, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if outliers:  # adaLN-modulated rows: some tokens and channels far larger than the rest
        x[:, :3] *= 30
        x[::7] *= 100
    w = torch.randn(N, K, generator=g) * K**-0.5
    b = torch.randn(N, generator=g)
    return x.to(dtype), w, b


def pack(w, b, backend):
    return prepack_int8(w, b, native=backend == "native")


def exact(x, w, b, gelu):
    y = F.linear(x.double(), w.double(), b.double())
    return F.gelu(y, approximate="tanh") if gelu else y


def assert_within_quantisation_bound(out, x, w, b, gelu):
    """|out - exact| <= the bound the two quantisation steps allow (kernels/linear_int8.py), plus the fp32
    (or bf16) roundings of the epilogue; and not exact: the GEMM did run in int8."""
    ref = exact(x, w, b, gelu)
    bound = error_bound(x, w) * (GELU_SLOPE if gelu else 1.0)
    eps = torch.finfo(out.dtype).eps
    bound = bound + ref.abs() * eps + 8 * torch.finfo(torch.float32).eps * (ref.abs() + bound)
    err = (out.double() - ref).abs()
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g} over the int8 bound"
    assert err.max() > 1e-6 * ref.abs().max(), "no quantisation error at all: the int8 path did not run"


def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step():
    x, _, _ = layer(33, 70, 1, outliers=True)
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (33, 1)
    assert (q.abs().amax(-1) == QMAX).all()  # each row's largest entry maps to +-127
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-6)).all()


def test_quantize_rows_zero_and_nonfinite_rows():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    x[0] = 0
    x[2, 5] = float("nan")
    q, s = quantize_rows(x)
    assert s[0] == 0 and (q[0] == 0).all()
    assert torch.isnan(s[2]) and torch.isfinite(s[1])


# -- per-output-channel weight scales ---------------------------------------------------------------------
# A weight whose rows differ RAMP-fold in range (a geometric ramp from 1 to 1 / RAMP over the output channels).
# One scale for the whole weight quantises the smallest rows in steps of the largest row's, ~RAMP times too
# coarse: their output channels lose up to ~20 log10(RAMP) = 34 dB. Measured on `ramp_layer()` (both backends,
# fp32 and bf16 x): per-row scales give every channel 37.3 to 42.4 dB, one global scale 6.4 dB on a smallest
# row's channel, while the SQNR of the whole output is 39.5 against 31.2 dB: only a per-channel measure
# separates them, and the worst-case `error_bound` test below passes with either.
RAMP = 50
CHANNEL_SQNR_DB = 30.0  # per row: >= 37 dB on every channel; one global scale: ~6 dB on the smallest rows


def ramp_layer(M=128, K=256, N=48, seed=21):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    ramp = torch.logspace(0, -math.log10(RAMP), N)  # row n scaled by RAMP ** (-n / (N - 1))
    w = torch.randn(N, K, generator=g) * K**-0.5 * ramp[:, None]
    return x, w


def channel_sqnr_db(out, x, w):
    """SQNR in dB of each output channel (column of out) against x @ w^T in float64."""
    ref = x.double() @ w.double().t()
    return torch.tensor([sqnr_db(out[:, n], ref[:, n]) for n in range(w.shape[0])])


def global_scale_pack(w, backend):
    """An Int8Linear quantised with ONE scale for the whole weight (the quantiser's own rounding, applied to w
    as a single row), scales broadcast to every channel: the quantisation the per-row tests must reject."""
    N = w.shape[0]
    q, s = quantize_rows(w.reshape(1, -1))
    return Int8Linear(q.view_as(w).contiguous(), s.reshape(()).expand(N).contiguous(), None, N, backend == "native")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_scale_is_per_output_row(backend):
    """`prepack_int8`'s scale is max_k |w_nk| / 127 per output row n, and each row's largest weight maps to
    +-127 (one global scale would leave the small rows a few levels)."""
    _, w = ramp_layer()
    p = pack(w, None, backend)
    assert p.scale.shape == (w.shape[0],) and p.scale.dtype == torch.float32 and p.weight.dtype == torch.int8
    assert torch.equal(p.scale, w.abs().amax(1) / QMAX)
    assert (p.weight.abs().amax(1) == QMAX).all()
    assert ((p.weight.float() * p.scale[:, None] - w).abs() <= p.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert p.native == (backend == "native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_channel_keeps_its_sqnr(backend, dtype):
    """Each output channel's SQNR stays above CHANNEL_SQNR_DB on a weight whose rows differ 50x in range; and
    the same weight quantised with one global scale misses that bound (the test tells the two apart)."""
    x, w = ramp_layer()
    x = x.to(dtype)
    per_row = channel_sqnr_db(linear_int8(x, pack(w, None, backend)), x, w)
    worst = int(per_row.argmin())
    assert per_row.min() > CHANNEL_SQNR_DB, (f"{backend} {dtype}: channel {worst} (row range "
                                             f"{float(w[worst].abs().max()):.3g}) at {float(per_row.min()):.1f} dB")
    if dtype == torch.float32:
        one_scale = channel_sqnr_db(linear_int8(x, global_scale_pack(w, backend)), x, w)
        assert one_scale.min() < CHANNEL_SQNR_DB - 10, f"a global scale gave {float(one_scale.min()):.1f} dB"
        assert one_scale.argmin() >= w.shape[0] - 4  # the loss is on the smallest rows


# -- the bound, on every backend ---------------------------------------------------------------------------
# The C++ kernel has a load and a store path per dtype; the torch body widens x to fp32 first and rounds the
# output last, so fp32 covers its arithmetic.
DTYPES = {"native": (torch.float32, torch.bfloat16, torch.float16), "reference": (torch.float32,)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("M, K, N", [(64, 384, 1152), (37, 96, 80), (1, 1536, 384), (512, 64, 24), (130, 341, 59)])
def test_within_the_bound(backend, M, K, N, gelu):
    for dtype in DTYPES[backend]:
        x, w, b = layer(M, K, N, dtype, seed=M * K, outliers=M == 130)
        assert_within_quantisation_bound(linear_int8(x, pack(w, b, backend), gelu), x, w, b, gelu)


@native
def test_native_quantises_as_the_torch_body():
    """The same int8 operands (hence the same int32 sums) in both forms: without GELU the fp32 results agree
    bit for bit, which they would not if a row's rounding or scale differed."""
    x, w, b = layer(200, 384, 1152, seed=3, outliers=True)
    p = prepack_int8(w, b)
    torch.testing.assert_close(linear_int8(x, p), _linear_int8_torch(x, p.weight, p.scale, p.bias, False),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_and_edges(backend):
    _, w, b = layer(1, 16, 12)
    p = pack(w, b, backend)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(4))
    assert linear_int8(x, p).shape == (2, 3, 12)
    assert linear_int8(torch.zeros(0, 16), p).shape == (0, 12)
    torch.testing.assert_close(linear_int8(torch.zeros(4, 16), p), b.expand(4, 12))  # a zero row is the bias
    bad = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    bad[1, 3] = float("inf")
    out = linear_int8(bad, p)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


# -- bad inputs: one table, every backend; the registered op's C++ checks against its Python body ------------
# The registered op's two implementations: its C++ CPU kernel ("native", what the dispatcher runs on CPU tensors)
# and its Python body (the fallback without the extension; what CUDA runs), reached past the C++ kernel.
OP_IMPLS = [pytest.param("native", marks=native, id="native"), pytest.param("python", id="python-body")]
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def run_op(impl, *args):
    op = torch.ops.ditengine.linear_int8
    return op(*args) if impl == "native" else op.default.redispatch(PYTHON_BODY, *args)


def small(seed=6):
    """A fresh seeded (3, 16) x and a packed (12, 16) layer with bias."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(3, 16, generator=g), torch.randn(12, 16, generator=g) * 0.25, torch.randn(12, generator=g)
    return x, w, b, prepack_int8(w, b)


def op_args(**change):
    x, w, b, p = small()
    args = dict(x=x, weight=p.weight, weight_scale=p.scale, bias=p.bias, apply_gelu=False)
    args.update({k: v(args, w) for k, v in change.items()})
    return list(args.values())


# (id, call(backend or impl), exception type, regex naming the argument[, {backend: why it fails instead}]).
# One check (`check_linear_int8`) serves the public function on every backend, the op's Python body and its fake,
# and the C++ kernel raises the same in the same words: ValueError for a shape or value, TypeError for a dtype
# (csrc/checks.h's convention). (The C++ kernel raised RuntimeError for all of these, and the torch body checked
# nothing, before they agreed.)
API_ROWS = [
    ("prepack-w-3d", lambda be: pack(small()[1].view(3, 4, 16), None, be), ValueError,
     r"w: expected \(N, K\) and b \(N,\), got \(3, 4, 16\)"),
    ("prepack-b-shape", lambda be: pack(small()[1], small()[2][:5], be), ValueError,
     r"w: expected \(N, K\) and b \(N,\), got \(12, 16\) and \(5,\)"),
    ("x-last-dim", lambda be: linear_int8(small()[0][:, :15], pack(*small()[1:3], be)), ValueError,
     "does not take x's last dimension 15"),
    ("x-dtype", lambda be: linear_int8(small()[0].double(), pack(*small()[1:3], be)), TypeError,
     "x must be float32, bfloat16 or float16, got Double"),
    ("x-device", lambda be: linear_int8(small()[0].to("meta"), pack(*small()[1:3], be)), ValueError,
     "x, weight and weight_scale must be on one device, got meta, cpu and cpu"),
    ("x-list", lambda be: linear_int8([1.0], pack(*small()[1:3], be)), TypeError,
     "x: expected a torch.Tensor, got list"),
]
OP_ROWS = [
    ("op-x-last-dim", lambda impl: run_op(impl, *op_args(x=lambda a, w: a["x"][:, :15])), ValueError,
     r"weight \[12, 16\] does not take x's last dimension 15"),
    ("op-x-dtype", lambda impl: run_op(impl, *op_args(x=lambda a, w: a["x"].double())), TypeError,
     "x must be float32, bfloat16 or float16, got Double"),
    ("op-weight-not-int8", lambda impl: run_op(impl, *op_args(weight=lambda a, w: w)), TypeError,
     r"weight must be \(N, K\) int8, got \[12, 16\] Float"),
    ("op-weight-1d", lambda impl: run_op(impl, *op_args(weight=lambda a, w: a["weight"][0])), ValueError,
     r"weight must be \(N, K\) int8, got \[16\] Char"),
    ("op-weight_scale-shape", lambda impl: run_op(impl, *op_args(weight_scale=lambda a, w: a["weight_scale"][:5])),
     ValueError, r"weight_scale must be \(12\) float32, got \[5\]"),
    ("op-weight_scale-dtype",
     lambda impl: run_op(impl, *op_args(weight_scale=lambda a, w: a["weight_scale"].bfloat16())), TypeError,
     r"weight_scale must be \(12\) float32, got \[12\] BFloat16"),
    ("op-bias-shape", lambda impl: run_op(impl, *op_args(bias=lambda a, w: a["bias"][:5])), ValueError,
     r"bias must be a \(12\) float32 CPU tensor, got \[5\]"),
    ("op-bias-dtype", lambda impl: run_op(impl, *op_args(bias=lambda a, w: a["bias"].bfloat16())), TypeError,
     r"bias must be a \(12\) float32 CPU tensor, got \[12\] BFloat16"),
    # A meta x among CPU tensors: the dispatcher sends the call to the fake, which checks as the body does.
    ("op-x-device", lambda impl: run_op(impl, *op_args(x=lambda a, w: a["x"].to("meta"))), ValueError,
     "x, weight and weight_scale must be on one device, got meta, cpu and cpu"),
]


@pytest.mark.parametrize("call, where, error, match",
                         bad_input_table(API_ROWS, BACKENDS) + bad_input_table(OP_ROWS, OP_IMPLS))
def test_bad_input_names_the_argument(call, where, error, match):
    """The public calls on every backend, and the registered op called directly: its C++ kernel and its Python
    body must raise the same exception type, each naming the argument."""
    with pytest.raises(error, match=match):
        call(where)


@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    code = """
        import torch
        from ditengine.kernels import linear_int8, prepack_int8, _native
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(70, 341, generator=g), torch.randn(59, 341, generator=g), torch.randn(59, generator=g)
        p = prepack_int8(w, b)
        outs = [_native.build_info()["isa"]]
        for dt in (torch.float32, torch.bfloat16):
            outs += [linear_int8(x.to(dt), p), linear_int8(x.to(dt), p, True)]
        torch.save(outs, "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_isa_variants_agree(isa, isa_variant):
    """The quantisation is exact arithmetic on each variant: plain outputs agree bit for bit with the
    baseline; the GELU's vector exp differs from libm's by a few ulp."""
    skip_unless_cpu_runs(isa)
    vec, base = isa_variant(isa), isa_variant("baseline")
    for i, (a, b) in enumerate(zip(vec, base)):
        if i % 2 == 0:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5 if a.dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if a.dtype == torch.float32 else 1e-2)
