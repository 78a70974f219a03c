"""The kernel tolerance rule (flash-attention's), written once.

A kernel output passes when max|out - ref32| <= 2 * max|ref_lp - ref32| + floor, with ref32 the
reference in fp32 and ref_lp the same reference run in the kernel's precision: the kernel may be at
most twice as wrong as PyTorch itself is in that precision.
"""
import torch


def assert_within_tolerance(out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor, floor: float = 1e-5,
                            name: str = "output") -> None:
    out, ref32, ref_lp = (t.detach().double().cpu() for t in (out, ref32, ref_lp))
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref32)
    assert torch.equal(nan_out, nan_ref), (
        f"{name}: NaN pattern differs from the reference ({int(nan_out.sum())} vs {int(nan_ref.sum())} NaNs)")
    finite = ~nan_ref
    kernel_err = (out - ref32)[finite].abs().nan_to_num(nan=float("inf"))
    torch_err = (ref_lp - ref32)[finite].abs().nan_to_num(nan=float("inf"))
    torch_worst = torch_err.max().item() if torch_err.numel() else 0.0
    bound = 2 * torch_worst + floor
    worst = kernel_err.max().item() if kernel_err.numel() else 0.0
    if worst > bound:
        bad = ((out - ref32).abs() > bound) & finite
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: max|out - ref32| = {worst:.3e} exceeds 2 * max|ref_lp - ref32| + floor = {bound:.3e} "
            f"(max|ref_lp - ref32| = {torch_worst:.3e}); first bad index {index}: "
            f"out={out[index].item():.6g}, ref32={ref32[index].item():.6g}")
