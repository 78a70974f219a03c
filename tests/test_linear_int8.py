import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import linear_int8, prepack_int8
from ditengine.kernels.linear_int8 import QMAX, _linear_int8_torch, error_bound, quantize_rows

from support.native_helpers import isa_runner, needs_native, skip_unless_cpu_runs

native = needs_native("linear_int8")
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
    x = torch.randn(3, 8)
    x[0] = 0
    x[2, 5] = float("nan")
    q, s = quantize_rows(x)
    assert s[0] == 0 and (q[0] == 0).all()
    assert torch.isnan(s[2]) and torch.isfinite(s[1])


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("M, K, N", [(64, 384, 1152), (37, 96, 80), (1, 1536, 384), (512, 64, 24)])
def test_torch_body_within_the_bound(M, K, N, gelu):
    x, w, b = layer(M, K, N, seed=M + K)
    p = prepack_int8(w, b, native=False)
    assert_within_quantisation_bound(linear_int8(x, p, gelu), x, w, b, gelu)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
@pytest.mark.parametrize("M, K, N", [(64, 384, 1152), (37, 96, 80), (1, 1536, 384), (130, 341, 59)])
def test_native_within_the_bound(M, K, N, dtype, gelu):
    x, w, b = layer(M, K, N, dtype, seed=M * K, outliers=M == 130)
    assert_within_quantisation_bound(linear_int8(x, prepack_int8(w, b), gelu), x, w, b, gelu)


@native
def test_native_quantises_as_the_torch_body():
    """The same int8 operands (hence the same int32 sums) in both forms: without GELU the fp32 results agree
    bit for bit, which they would not if a row's rounding or scale differed."""
    x, w, b = layer(200, 384, 1152, seed=3, outliers=True)
    p = prepack_int8(w, b)
    torch.testing.assert_close(linear_int8(x, p), _linear_int8_torch(x, p.weight, p.scale, p.bias, False),
                               rtol=0, atol=0)


@native
def test_native_shapes_and_edges():
    _, w, b = layer(1, 16, 12)
    p = prepack_int8(w, b)
    x = torch.randn(2, 3, 16)
    assert linear_int8(x, p).shape == (2, 3, 12)
    assert linear_int8(torch.zeros(0, 16), p).shape == (0, 12)
    torch.testing.assert_close(linear_int8(torch.zeros(4, 16), p), b.expand(4, 12))  # a zero row is the bias
    bad = torch.randn(4, 16)
    bad[1, 3] = float("inf")
    out = linear_int8(bad, p)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


@native
def test_native_rejects_bad_arguments():
    _, w, b = layer(1, 16, 12)
    p = prepack_int8(w, b)
    with pytest.raises(RuntimeError, match="does not take x's last dimension 15"):
        torch.ops.ditengine.linear_int8(torch.randn(3, 15), p.weight, p.scale, p.bias, False)
    with pytest.raises(RuntimeError, match="weight must be \\(N, K\\) int8"):
        torch.ops.ditengine.linear_int8(torch.randn(3, 16), w, p.scale, p.bias, False)
    with pytest.raises(RuntimeError, match="weight_scale must be"):
        torch.ops.ditengine.linear_int8(torch.randn(3, 16), p.weight, p.scale[:5], p.bias, False)
    with pytest.raises(ValueError, match="w: expected"):
        prepack_int8(torch.randn(3, 4, 5))


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
