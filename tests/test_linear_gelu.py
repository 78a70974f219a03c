import importlib
import logging

import pytest
import torch

from ditengine.kernels import linear, linear_gelu, linear_gelu_ref, prepack_linear

from native_helpers import needs_native
from tolerance import assert_within_tolerance, fp32_floor

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
native = needs_native("linear_gelu")
lg = importlib.import_module("ditengine.kernels.linear_gelu")  # the module; the package exports the function


def layer(M, K, N, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, w, b


def check(out, x, w, b, gelu=True, name="out"):
    """Tolerance rule against the fp32 reference; ref_lp is PyTorch's own run in x's dtype."""
    if gelu:
        ref32 = linear_gelu_ref(x.float(), w.float(), b.float())
        ref_lp = linear_gelu_ref(x, w, b)
    else:
        ref32 = torch.nn.functional.linear(x.float(), w.float(), b.float())
        ref_lp = torch.nn.functional.linear(x, w, b)
    assert out.shape == ref32.shape and out.dtype == x.dtype
    assert_within_tolerance(out, ref32, ref_lp if x.dtype != torch.float32 else ref32, FLOOR[x.dtype], name)


def test_reference_is_the_tanh_gelu():
    x, w, b = layer(8, 16, 12, torch.float32)
    y = x @ w.t() + b
    expected = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    torch.testing.assert_close(linear_gelu_ref(x, w, b), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
def test_reference_backend_matches(dtype, gelu):
    x, w, b = layer(37, 48, 80, dtype, seed=1, lead=(2,))
    packed = prepack_linear(w, b, dtype=dtype, backend="reference")
    check((linear_gelu if gelu else linear)(x, packed), x, w, b, gelu, "reference backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mkldnn_backend_where_its_probe_passes(dtype):
    if not lg.mkldnn_gelu_is_tanh(dtype):
        pytest.skip(f"oneDNN linear+GELU-tanh is not usable in {dtype} on this CPU (the probe says so)")
    x, w, b = layer(64, 96, 160, dtype, seed=2)
    packed = prepack_linear(w, b, dtype=dtype, backend="mkldnn", batch_size=64)
    check(linear_gelu(x, packed), x, w, b, True, "mkldnn gelu")
    check(linear(x, packed), x, w, b, False, "mkldnn plain")


def test_probe_decides_from_what_the_op_computes(monkeypatch):
    """The probe accepts only an op that runs and computes the tanh GELU: an erf GELU or an error is refused."""
    real = lg._mkldnn_call

    def erf_gelu(x, w, b, apply_gelu):
        y = real(x, w, b, False)
        return torch.nn.functional.gelu(y) if apply_gelu else y

    def unsupported(x, w, b, apply_gelu):
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(lg, "_mkldnn_call", erf_gelu)
        lg.mkldnn_gelu_is_tanh.cache_clear()
        assert not lg.mkldnn_gelu_is_tanh(torch.float32)
    monkeypatch.setattr(lg, "_mkldnn_call", unsupported)
    lg.mkldnn_gelu_is_tanh.cache_clear()
    assert not lg.mkldnn_gelu_is_tanh(torch.float32)
    monkeypatch.setattr(lg, "_mkldnn_call", real)
    lg.mkldnn_gelu_is_tanh.cache_clear()


@pytest.mark.parametrize("capability, fp32_choice", [("AVX512", "mkldnn"), ("AVX2", "native")])
def test_choice_follows_the_probe_the_cpu_and_the_extension(monkeypatch, capability, fp32_choice):
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: True)
    monkeypatch.setattr(lg, "native_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert lg.choose_backend(torch.bfloat16) == "mkldnn"  # bf16 dots in oneDNN beat fp32 GEMMs
    assert lg.choose_backend(torch.float32) == fp32_choice  # oneDNN's AVX-512 fp32 GEMM beats the BLAS
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: False)
    assert lg.choose_backend(torch.bfloat16) == "native"
    monkeypatch.setattr(lg, "native_available", lambda: False)
    assert lg.choose_backend(torch.bfloat16) == "reference"
    monkeypatch.setattr(lg, "mkldnn_gelu_is_tanh", lambda dtype: dtype == torch.float32)
    assert lg.choose_backend(torch.float32) == "mkldnn"
    assert lg.choose_backend(torch.bfloat16) == "reference"


def test_backend_choice_is_logged_once(caplog):
    lg._log_backend.cache_clear()
    _, w, b = layer(4, 8, 8, torch.float32)
    with caplog.at_level(logging.INFO, logger="ditengine"):
        prepack_linear(w, b, backend="reference")
        prepack_linear(w, b, backend="reference")
    assert sum("CPU linear (+GELU) in torch.float32 runs reference" in r.message for r in caplog.records) == 1


def test_auto_packing_runs_and_matches():
    x, w, b = layer(20, 32, 64, torch.bfloat16, seed=3)
    packed = prepack_linear(w, b, dtype=torch.bfloat16)
    assert packed.backend in ("mkldnn", "native", "reference")
    check(linear_gelu(x, packed), x, w, b, True, f"auto ({packed.backend})")


def test_prepack_errors():
    x, w, b = layer(4, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        prepack_linear(w, b, backend="cuda")
    with pytest.raises(ValueError, match=r"w: expected \(N, K\) and b \(N,\), got \(8, 8\) and \(7,\)"):
        prepack_linear(w, b[:7])
    packed = prepack_linear(w, b, backend="reference")
    with pytest.raises(TypeError, match="x: expected dtype torch.float32 .* got torch.bfloat16"):
        linear_gelu(x.bfloat16(), packed)


def test_registered_op_passes_opcheck():
    x, w, b = layer(6, 16, 24, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, b, True))


# -- the native CPU kernel (csrc/linear_gelu.cpp) --------------------------------------------------------
@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M, K, N", [(1, 8, 8), (97, 72, 300), (300, 384, 1536), (130, 40, 520)])
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
def test_native_matches_reference(M, K, N, dtype, gelu):
    """fp32 prepacked weights (the fast form) and weights in x's dtype; odd sizes cross every tile edge."""
    x, w, b = layer(M, K, N, dtype, seed=M + K + N, lead=(2,))
    for weight, bias in ((w.float(), b.float()), (w, b)):
        out = torch.ops.ditengine.linear_gelu(x, weight, bias, gelu)
        check(out, x, w, b, gelu, f"native M={M} K={K} N={N} weight {weight.dtype}")
    out = torch.ops.ditengine.linear_gelu(x, w.float(), None, gelu)
    check(out, x, w, torch.zeros_like(b), gelu, "native without bias")


@native
def test_native_prepacked_path_matches():
    x, w, b = layer(64, 96, 200, torch.bfloat16, seed=5)
    packed = prepack_linear(w, b, dtype=torch.bfloat16, backend="native")
    assert packed.weight.dtype == torch.float32
    check(linear_gelu(x, packed), x, w, b, True, "prepacked gelu")
    check(linear(x, packed), x, w, b, False, "prepacked plain")


@native
def test_native_extreme_and_nan_inputs():
    x, w, b = layer(16, 8, 24, torch.float32, seed=6)
    x[0] *= 1e4  # pre-activations far into both saturated ends of the GELU
    x[3, 2] = float("nan")  # one row of x: only that output row is NaN
    out = torch.ops.ditengine.linear_gelu(x, w, b, True)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[torch.arange(16) != 3]).all()
    # The tolerance rule with an fp64 reference (an fp32 one against itself would leave only the floor), row 0
    # apart: its fp32 rounding (|y| ~ 1e4) would otherwise set the bound for rows of |y| ~ 1.
    ref_hi, ref_lp = linear_gelu_ref(x.double(), w.double(), b.double()), linear_gelu_ref(x, w, b)
    for rows, name in (([0], "saturated row"), ([r for r in range(16) if r not in (0, 3)], "ordinary rows")):
        assert_within_tolerance(out[rows], ref_hi[rows], ref_lp[rows], fp32_floor(ref_hi[rows]), name)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    x, w, b = layer(300, 96, 600, dtype, seed=7)
    first = torch.ops.ditengine.linear_gelu(x, w.float(), b.float(), True)
    assert all(torch.equal(first, torch.ops.ditengine.linear_gelu(x, w.float(), b.float(), True)) for _ in range(3))


@native
def test_native_errors():
    x, w, b = layer(4, 8, 12, torch.bfloat16)
    op = torch.ops.ditengine.linear_gelu
    with pytest.raises(RuntimeError, match=r"weight must be \(N, K\)"):
        op(x, w[0], b, True)
    with pytest.raises(RuntimeError, match="does not take x's last dimension 8"):
        op(x, w[:, :7], b, True)
    with pytest.raises(RuntimeError, match="weight must be float32 or x's dtype"):
        op(x, w.half(), b.half(), True)
    with pytest.raises(RuntimeError, match=r"bias must be \(12\)"):
        op(x, w, b[:5], True)
    with pytest.raises(RuntimeError, match="bias dtype Float must match weight dtype BFloat16"):
        op(x, w, b.float(), True)


@native
def test_native_float64_runs_the_torch_form():
    x, w, b = layer(5, 8, 12, torch.float64, seed=9)
    torch.testing.assert_close(torch.ops.ditengine.linear_gelu(x, w, b, True), linear_gelu_ref(x, w, b))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    x, w, b = layer(6, 16, 24, dtype, seed=8, lead=(2,))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w.float(), b.float(), True))
    torch.library.opcheck(torch.ops.ditengine.linear_gelu, (x, w, None, False))


@native
def test_native_bf16_rounding_is_torchs():
    """With K = 1 each output is one exact fp32 product, so the kernel's bf16 rounding (vectorised) must
    give torch's bits: round to nearest even, ties included, inf kept, NaN kept (its payload may differ)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(67, 1, generator=g).bfloat16()
    x[5, 0], x[6, 0], x[7, 0] = float("nan"), float("inf"), -float("inf")
    w = torch.randn(45, 1, generator=g)
    w[3, 0] = 1.0 + 2.0**-8  # products exactly halfway between two bf16 values
    out = torch.ops.ditengine.linear_gelu(x, w, None, False)
    expected = (x.float() * w.t()).bfloat16()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan) and nan.sum() == 45
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))
