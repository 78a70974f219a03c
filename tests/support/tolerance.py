"""The kernel tolerance rule (flash-attention's), written once.

A kernel output passes when max|out - ref32| <= 2 * max|ref_lp - ref32| + floor, with ref32 the
reference in fp32 and ref_lp the same reference run in the kernel's precision: the kernel may be at
most twice as wrong as PyTorch itself is in that precision. The bound covers the finite entries of ref32
only; where ref32 is NaN or +-Inf, the kernel must give exactly the same value (inf - inf would otherwise
make the bound itself infinite, and anything would pass).
"""
import torch


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def assert_within_tolerance(out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor, floor: float = 1e-5,
                            name: str = "output") -> None:
    out, ref32, ref_lp = (t.detach().double().cpu() for t in (out, ref32, ref_lp))
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    finite = torch.isfinite(ref32)
    # Non-finite reference entries: the same NaN, or the same signed Inf, and nothing else.
    same = torch.where(torch.isnan(ref32), torch.isnan(out), out == ref32)
    mismatch = ~finite & ~same
    if mismatch.any():
        index = _first_index(mismatch)
        raise AssertionError(
            f"{name}: {int(mismatch.sum())} entries differ where the reference is non-finite "
            f"({int((~finite).sum())} such entries); first at {index}: out={out[index].item():.6g}, "
            f"ref32={ref32[index].item():.6g}")
    # Finite reference entries: a NaN or Inf output there is an infinite error. Where the low-precision
    # reference itself overflowed, it does not widen the bound; the kernel may overflow the same way.
    lp_finite = finite & torch.isfinite(ref_lp)
    torch_err = (ref_lp - ref32)[lp_finite].abs()
    torch_worst = torch_err.max().item() if torch_err.numel() else 0.0
    bound = 2 * torch_worst + floor
    err = (out - ref32).abs().nan_to_num(nan=float("inf"))
    ok = (err <= bound) | (~torch.isfinite(ref_lp) & (out == ref_lp))
    bad = finite & ~ok
    worst = err[bad].max().item() if bad.any() else 0.0
    if bad.any():
        index = _first_index(bad)
        raise AssertionError(
            f"{name}: max|out - ref32| = {worst:.3e} exceeds 2 * max|ref_lp - ref32| + floor = {bound:.3e} "
            f"(max|ref_lp - ref32| = {torch_worst:.3e}); first bad index {index}: "
            f"out={out[index].item():.6g}, ref32={ref32[index].item():.6g}")


def fp32_floor(ref_hi: torch.Tensor, ulps: int = 4) -> float:
    """A tolerance floor of a few fp32 roundings at the output's scale: the kernels' arithmetic is fp32, and
    a low precision's rounding is in the rule's 2 * max|ref_lp - ref_hi| already."""
    finite = ref_hi.detach()[torch.isfinite(ref_hi)]
    return ulps * torch.finfo(torch.float32).eps * (finite.abs().max().item() if finite.numel() else 0.0)


def assert_fp32_run_within_tolerance(out: torch.Tensor, run, model: torch.nn.Module, name: str = "output",
                                     steps: int = 1) -> None:
    """The rule for an fp32 run of a whole model or sampling loop: `run(model)` gives the reference, so
    ref32 is `run` on a float64 copy of the model and ref_lp `run` on the model itself in fp32. A fused
    fp32 path may then be at most twice as far from the float64 answer as PyTorch's own fp32 is, plus a
    floor of fp32 roundings at the output's scale, 64 for one forward and 16 more per step of a loop: the
    fused GEMMs may accumulate in another order than PyTorch's BLAS (oneDNN's K-blocked kernels, about
    sqrt(K) roundings per dot product), compounded over the layers and the `steps` of a run (a stochastic
    sampler carries each step's error into the next). A wrong kernel is off by orders of magnitude more."""
    import copy

    ref64 = run(copy.deepcopy(model).double())
    ref32 = run(model)
    assert_within_tolerance(out, ref64, ref32, fp32_floor(ref64, max(64, 16 * steps)), name)

