import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import fp8_supported, linear_fp8, prepack_fp8
from ditengine.kernels.linear_fp8 import FP8, FP8_MAX, element_error, quantize_rows_fp8


def layer(M, K, N, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, :2] *= 20  # outlier channels, as adaLN-modulated activations have
    w = torch.randn(N, K, generator=g) * K**-0.5
    return x.to(device), w.to(device), torch.randn(N, generator=g).to(device)


def fp8_bound(x, w):
    """|x . w - (s q) . (ws wq)| per output element from the per-element e4m3 bounds (float64)."""
    qx, sx = quantize_rows_fp8(x)
    qw, sw = quantize_rows_fp8(w)
    ex, ew = element_error(x, sx), element_error(w, sw)
    x, w = x.double().abs(), w.double().abs()
    return ex @ w.t() + x @ ew.t() + ex @ ew.t()


def test_quantize_rows_fp8_within_the_element_bound():
    x, _, _ = layer(33, 70, 1)
    q, s = quantize_rows_fp8(x)
    assert q.dtype == FP8 and s.shape == (33, 1)
    assert (q.float().abs().amax(-1) == FP8_MAX).all()  # each row's largest entry maps to e4m3's largest
    assert ((q.float() * s - x).abs().double() <= element_error(x, s)).all()
    q0, s0 = quantize_rows_fp8(torch.zeros(2, 8))
    assert (s0 == 0).all() and (q0.float() == 0).all()


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
def test_emulated_linear_within_the_bound(gelu):
    x, w, b = layer(64, 384, 200, seed=1)
    out = linear_fp8(x, prepack_fp8(w, b, emulate=True), gelu)
    ref = F.linear(x.double(), w.double(), b.double())
    bound = fp8_bound(x, w) * (1.13 if gelu else 1.0) + 1e-5 * (ref.abs() + 1)
    ref = F.gelu(ref, approximate="tanh") if gelu else ref
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"worst excess {float((err - bound).max()):.3g}"
    assert err.max() > 1e-4  # it did quantise


def _scaled_mm_runs_on_cpu() -> bool:
    try:
        a = torch.ones(16, 16).to(FP8)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _scaled_mm_runs_on_cpu(), reason="this torch has no CPU torch._scaled_mm with row-wise "
                                                         "scales")
def test_scaled_mm_matches_the_emulation():
    """The same e4m3 operands through torch's fp8 GEMM (oneDNN on a CPU): equal to the emulated product up to
    the bf16 rounding of the GEMM's output."""
    x, w, b = layer(48, 256, 96, seed=2)
    fast = linear_fp8(x, prepack_fp8(w, b))
    emulated = linear_fp8(x, prepack_fp8(w, b, emulate=True))
    assert ((fast - emulated).abs() <= 2**-8 * (emulated - b).abs() + 1e-5).all()


def test_fp8_needs_fp8_tensor_cores():
    assert not fp8_supported(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 tensor cores (sm_89+)")
@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
def test_gpu_scaled_mm_within_the_bound(gelu):
    x, w, b = layer(512, 1152, 4608, seed=3, device="cuda")
    out = linear_fp8(x.bfloat16(), prepack_fp8(w, b), gelu)
    ref = F.linear(x.double(), w.double(), b.double())
    bound = (fp8_bound(x, w) + 2**-8 * ref.abs()) * (1.13 if gelu else 1.0) + 2**-8 * ref.abs() + 1e-3
    ref = F.gelu(ref, approximate="tanh") if gelu else ref
    assert ((out.double() - ref).abs() <= bound).all()
