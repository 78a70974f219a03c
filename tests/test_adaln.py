import pytest
import torch

from ditengine.kernels import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref

from tolerance import assert_within_tolerance

# (B, T, D): DiT widths (384, 768, 1024, 1152), odd widths (59, 341), T = 1, 97, 256, B = 1 and 3;
# kept small for Triton's interpreter (about 5 ms per row on a CPU).
SHAPES = [(1, 1, 384), (3, 1, 1152), (1, 16, 768), (1, 16, 1024), (2, 16, 1152), (1, 256, 59), (3, 97, 341)]
CPU_DTYPES = [torch.float32, torch.float16]  # bf16 is wrong in the interpreter: GPU only (DESIGN.md section 6)
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(B, T, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, device=device).to(dtype)
    o = torch.randn(B, T, D, generator=g, device=device).to(dtype)
    modulation = torch.randn(B, 6 * D, generator=g, device=device).to(dtype)  # as the adaLN linear emits it
    return x, o, modulation.chunk(6, dim=1)  # strided (B, D) views, row stride 6D


def check_adaln(B, T, D, dtype, device="cpu"):
    x, _, (shift, scale, *_) = make_inputs(B, T, D, dtype, device)
    out = adaln_modulate(x, shift, scale)
    assert out.dtype == dtype and out.shape == (B, T, D)
    ref32 = adaln_modulate_ref(x.float(), shift.float(), scale.float())
    ref_lp = adaln_modulate_ref(x, shift, scale, upcast=False)
    assert_within_tolerance(out, ref32, ref_lp, FLOOR[dtype], "adaln_modulate")


def check_gated(B, T, D, dtype, device="cpu"):
    x, o, (_, _, gate, shift, scale, _) = make_inputs(B, T, D, dtype, device)
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale)
    ref_x32, ref_y32 = gated_residual_adaln_ref(x.float(), gate.float(), o.float(), shift.float(), scale.float())
    lp_x, lp_y = gated_residual_adaln_ref(x, gate, o, shift, scale, upcast=False)
    assert x_new.dtype == dtype and y.dtype == dtype
    assert_within_tolerance(x_new, ref_x32, lp_x, FLOOR[dtype], "x_new")
    assert_within_tolerance(y, ref_y32, lp_y, FLOOR[dtype], "y")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, T, D", SHAPES)
def test_adaln_modulate_matches_reference(B, T, D, dtype):
    check_adaln(B, T, D, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("B, T, D", SHAPES)
def test_gated_residual_adaln_matches_reference(B, T, D, dtype):
    check_gated(B, T, D, dtype)


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


def test_inplace_and_fp32_residual_with_half_output():
    x, o, (_, _, gate, shift, scale, _) = make_inputs(2, 9, 96, torch.float32)
    o16 = o.half()
    ref_x, ref_y = gated_residual_adaln_ref(x, gate, o16, shift, scale)
    residual = x.clone()
    x_new, y = gated_residual_adaln(residual, gate, o16, shift, scale, inplace=True)
    assert x_new is residual and x_new.dtype == torch.float32 and y.dtype == torch.float16
    torch.testing.assert_close(residual, ref_x)
    torch.testing.assert_close(y, ref_y)
    y32 = adaln_modulate(x.half(), shift, scale, out_dtype=torch.float32)
    assert y32.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_stay_in_their_row():
    x, o, (shift, scale, gate, *_) = make_inputs(2, 6, 64, torch.float32)
    x[0, 1, 5] = float("nan")
    x[1, 3, 0] = float("inf")
    y = adaln_modulate(x, shift, scale)
    assert torch.isnan(y[0, 1]).all() and torch.isnan(y[1, 3]).all()
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    assert torch.isfinite(y[~bad]).all()
    torch.testing.assert_close(y[~bad], adaln_modulate_ref(x, shift, scale)[~bad])
    x_new, y = gated_residual_adaln(x, gate, o, shift, scale)
    assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[~bad]).all()


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


def test_registered_ops_pass_opcheck():
    x, o, (shift, scale, gate, *_) = make_inputs(1, 3, 16, torch.float32)
    torch.library.opcheck(torch.ops.ditengine.adaln_modulate, (x, shift, scale, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln, (x, gate, o, shift, scale, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.ditengine.gated_residual_adaln_,
                          (x.clone(), gate, o, shift, scale, 1e-6, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B, T, D", [(2, 256, 1152), (16, 256, 1152), (2, 1024, 1152), (3, 97, 341), (1, 1, 59),
                                     (2, 256, 384), (2, 256, 768), (2, 256, 1024)])
def test_gpu_matches_reference(B, T, D, dtype):
    check_adaln(B, T, D, dtype, "cuda")
    check_gated(B, T, D, dtype, "cuda")
