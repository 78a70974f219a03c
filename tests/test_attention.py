import importlib

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import attention, attention_ref
from ditengine.kernels.attention import AUTOTUNE_CONFIGS, CONFIG_KEYS, head_blocks

from support.native_helpers import needs_native, triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

attn = importlib.import_module("ditengine.kernels.attention")  # the module; the package exports the function


def references(q, k, v, softmax_scale=None):
    """(ref_hi, ref_lp) for the tolerance rule: the reference one precision above the inputs' (fp32 math for
    fp16 / bf16, fp64 for fp32, where an fp32 reference against itself would leave only the floor) and the
    same reference in the inputs' precision."""
    if q.dtype == torch.float32:
        return attention_ref(q.double(), k.double(), v.double(), softmax_scale), attention_ref(q, k, v, softmax_scale)
    return attention_ref(q, k, v, softmax_scale), attention_ref(q, k, v, softmax_scale, upcast=False)


# (B, H, T, Dh); T = 1, 16, 97, 256; every supported DiT-relevant head dim; interpreter-sized.
CASES = [(2, 1, 16, 32), (1, 2, 16, 64), (1, 2, 16, 72), (1, 2, 16, 96), (1, 2, 16, 128), (2, 2, 1, 72),
         (1, 2, 97, 64), (2, 1, 97, 72), (1, 1, 97, 128), (1, 1, 256, 64)]


def packed_qkv(B, H, T, Dh, dtype, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(B, T, 3, H, Dh, generator=g, device=device).to(dtype)


def split(qkv):
    return qkv.permute(2, 0, 3, 1, 4)  # q, k, v, each (B, H, T, Dh) views


def check(B, H, T, Dh, dtype, device="cpu", head_split=True, config=None, separate=True):
    """The Triton kernel (named, never the default: on CPU that is the native kernel) against the reference,
    from the packed qkv and, with `separate`, from q, k, v; `config` forces one launch config."""
    qkv = packed_qkv(B, H, T, Dh, dtype, device)
    out = attention(qkv, head_split=head_split, backend="triton", config=config)
    assert out.shape == (B, T, H, Dh) and out.is_contiguous() and out.dtype == dtype
    q, k, v = split(qkv)
    ref_hi, ref_lp = (r.transpose(1, 2) for r in references(q, k, v))
    name = f"B={B} H={H} T={T} Dh={Dh}{f' config {config}' if config else ''}"
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), f"packed {name}")
    if separate:
        out = attention(q, k, v, head_split=head_split, backend="triton", config=config)
        assert out.shape == (B, H, T, Dh)
        assert_within_tolerance(out.transpose(1, 2), ref_hi, ref_lp, fp32_floor(ref_hi), f"separate {name}")


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B, H, T, Dh", CASES)
def test_matches_reference(B, H, T, Dh, dtype):
    check(B, H, T, Dh, dtype)


@triton_cpu
@pytest.mark.parametrize("B, H, T, Dh", [(1, 1, 257, 96), (1, 1, 129, 72)])
def test_fp32_past_one_block_of_256(B, H, T, Dh):
    """The GPU fp32 shapes on CPU: T = 257 leaves one valid query row and one key in the last blocks."""
    check(B, H, T, Dh, torch.float32, separate=False)


@triton_cpu
def test_forced_configs_launch_as_asked(monkeypatch):
    """Every autotune config, forced, through the interpreter (fp32, tiny shape): the launch uses that config's
    blocks and grid, and the output matches the reference."""
    launches = []
    kernel = attn._attention_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, {key: kwargs[key] for key in CONFIG_KEYS if key in kwargs}))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attn, "_attention_fwd_kernel", Spy())
    B, H, T, Dh = 1, 2, 97, 72  # 97 tokens: a partial last block for every BLOCK_M and BLOCK_N
    for config in AUTOTUNE_CONFIGS:
        launches.clear()
        check(B, H, T, Dh, torch.float32, config=config, separate=False)
        assert launches == [((-(-T // config["BLOCK_M"]), B * H), config)], launches


def test_config_errors_name_the_argument():
    qkv = packed_qkv(1, 1, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                         "backend='triton', got backend=None"):
        attention(qkv, config=AUTOTUNE_CONFIGS[0])
    with pytest.raises(ValueError, match="config: expected a dict with BLOCK_M and BLOCK_N"):
        attention(qkv, backend="triton", config=dict(BLOCK_M=32))
    with pytest.raises(ValueError, match="config: expected a dict with BLOCK_M and BLOCK_N"):
        attention(qkv, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=32, warps=4))
    with pytest.raises(ValueError, match="config: BLOCK_N must be a power of two >= 16, got 48"):
        attention(qkv, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=48))
    with pytest.raises(ValueError, match="config: num_stages must be a positive int, got 0"):
        attention(qkv, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=32, num_stages=0))


@triton_cpu
def test_padded_head_dim_matches_split():
    check(1, 2, 33, 72, torch.float32, head_split=False)
    assert head_blocks(72) == (64, 16) and head_blocks(72, head_split=False) == (128, 0)
    assert head_blocks(96) == (64, 32) and head_blocks(40) == (32, 16) and head_blocks(64) == (64, 0)


@triton_cpu
def test_reads_the_qkv_projection_output_directly():
    """From a real qkv Linear to the projection input, as in the DiT block, with no copies in between."""
    B, T, H, Dh = 2, 20, 2, 72
    qkv_linear = torch.nn.Linear(H * Dh, 3 * H * Dh)
    x = torch.randn(B, T, H * Dh)
    with torch.no_grad():
        qkv = qkv_linear(x).view(B, T, 3, H, Dh)
        ours = attention(qkv, backend="triton").view(B, T, H * Dh)
        q, k, v = split(qkv)
        expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@triton_cpu
def test_cross_lengths_scale_and_strided_views():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 2, 64, generator=g).transpose(1, 2)  # (B, H, T, Dh) view of (B, T, H, Dh)
    k = torch.randn(1, 2, 37, 64, generator=g)
    v = torch.randn(1, 2, 37, 64, generator=g)
    out = attention(q, k, v, softmax_scale=0.3, backend="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v, softmax_scale=0.3), rtol=1e-5, atol=1e-5)


@triton_cpu
def test_large_logits_stay_finite():
    qkv = packed_qkv(1, 1, 40, 64, torch.float32, seed=4)
    qkv[:, :, 0] *= 100.0
    qkv[:, :, 1] *= 100.0  # logits ~ 1e4 / 8
    out = attention(qkv, backend="triton")
    assert torch.isfinite(out).all()
    q, k, v = split(qkv)
    torch.testing.assert_close(out, attention_ref(q.double(), k.double(), v.double()).transpose(1, 2).float(),
                               rtol=1e-4, atol=1e-4)


@triton_cpu
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_does_not_leak():
    qkv = packed_qkv(2, 2, 40, 64, torch.float32, seed=5)
    qkv[0, 7, 0, 1, 3] = float("nan")  # one query row of batch 0, head 1
    qkv[1, 9, 1, 0, 0] = float("nan")  # one key of batch 1, head 0: poisons that head only
    out = attention(qkv, backend="triton")
    bad = torch.zeros(2, 40, 2, dtype=torch.bool)
    bad[0, 7, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()
    q, k, v = split(qkv)
    expected = attention_ref(q, k, v).transpose(1, 2)
    torch.testing.assert_close(out[~bad], expected[~bad], rtol=1e-5, atol=1e-5)


@triton_cpu
def test_same_inputs_same_bits():
    qkv = packed_qkv(1, 2, 33, 72, torch.float16, seed=6)
    assert torch.equal(attention(qkv, backend="triton"), attention(qkv, backend="triton"))


def test_errors():
    qkv = packed_qkv(1, 2, 8, 64, torch.float32)
    q, k, v = (t.contiguous() for t in split(qkv))
    with pytest.raises(ValueError, match=r"qkv: expected 5 dimensions \(B, T, 3, H, Dh\), got shape \(1, 8, 384\)"):
        attention(qkv.reshape(1, 8, 384))
    with pytest.raises(ValueError, match="dim 2 must be 3"):
        attention(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"k: batch, head count and head dim must match q \(1, 2, 8, 64\), got "
                                         r"\(1, 3, 8, 64\)"):
        attention(q, torch.randn(1, 3, 8, 64), torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 8, 64\)"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(TypeError, match=r"k: expected dtype in \['float32'\], got float16"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="head dim 12 is not supported"):
        attention(torch.randn(1, 4, 3, 2, 12))
    with pytest.raises(ValueError, match="head dim 70 is not supported"):
        attention(torch.randn(1, 4, 3, 1, 70))
    with pytest.raises(ValueError, match="head dim 512 is not supported"):
        attention(torch.randn(1, 1, 2, 512), torch.randn(1, 1, 2, 512), torch.randn(1, 1, 2, 512))
    with pytest.raises(ValueError, match="pass either qkv alone or all of q, k, v"):
        attention(q, k)
    with pytest.raises(ValueError, match="q: the last dimension must be contiguous"):
        attention(q.transpose(2, 3), k, v)


def test_registered_op_passes_opcheck():
    q, k, v = split(packed_qkv(1, 2, 8, 32, torch.float32))
    torch.library.opcheck(torch.ops.ditengine.attention, (q, k, v, 0.2, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [256, 1024, 4096])
@pytest.mark.parametrize("Dh, head_split", [(72, True), (72, False), (64, True)])
def test_gpu_dit_shapes(T, Dh, head_split, dtype):
    check(2 if T < 4096 else 1, 16, T, Dh, dtype, "cuda", head_split)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, T, Dh", [(1, 2, 97, 32), (3, 2, 257, 96), (2, 4, 1, 128), (1, 1, 129, 72)])
def test_gpu_odd_shapes_fp32(B, H, T, Dh):
    check(B, H, T, Dh, torch.float32, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T, Dh", [(1024, 72), (97, 64)])
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS,
                         ids=lambda c: "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_gpu_every_autotune_config(config, T, Dh, dtype):
    """The suite pins one config (DITENGINE_AUTOTUNE=0); the autotuner may pick any of these on a real run."""
    check(2, 16, T, Dh, dtype, "cuda", config=config)


# -- the native CPU kernel (csrc/attention.cpp) ------------------------------------------------------------
# The C++ kernel is the CPU kernel of torch.ops.ditengine.attention once the extension is loaded; these
# tests call the op through the dispatcher on CPU tensors, so they test it and nothing else.


native = needs_native("attention")
NATIVE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def native_attention(q, k, v, softmax_scale=None, tokens_first=False):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.ops.ditengine.attention(q, k, v, scale, tokens_first, True)


def check_native(qkv, dtype, name):
    q, k, v = split(qkv)
    ref_hi, ref_lp = references(q, k, v)  # (B, H, T, Dh)
    packed = native_attention(q, k, v, tokens_first=True)
    assert packed.shape == qkv[:, :, 0].shape and packed.is_contiguous() and packed.dtype == dtype
    assert_within_tolerance(packed.transpose(1, 2), ref_hi, ref_lp, fp32_floor(ref_hi), f"{name} packed")
    separate = native_attention(*(t.contiguous() for t in (q, k, v)))
    assert separate.shape == q.shape and separate.is_contiguous()
    assert_within_tolerance(separate, ref_hi, ref_lp, fp32_floor(ref_hi), f"{name} separate")


@native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 97, 256])
@pytest.mark.parametrize("Dh", [16, 64, 72, 128])
@pytest.mark.parametrize("B", [1, 2])
def test_native_matches_reference(B, Dh, T, dtype):
    qkv = packed_qkv(B, 3, T, Dh, dtype, seed=B * 1000 + Dh * 10 + T)
    check_native(qkv, dtype, f"B={B} T={T} Dh={Dh}")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_long_keys_and_cross_lengths(dtype):
    """More keys than one online-softmax block (512), unequal query / key lengths, a custom scale, and
    logits far apart so the running max changes between key blocks."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 70, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 1100, 16, generator=g)
    k[:, :, 900:] *= 4.0  # the largest logits sit in the last key block
    k = k.to(dtype)
    v = torch.randn(2, 2, 1100, 16, generator=g).to(dtype)
    out = native_attention(q, k, v, softmax_scale=0.7)
    ref_hi, ref_lp = references(q, k, v, softmax_scale=0.7)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), "long keys")


@native
def test_native_reads_strided_views_and_writes_tokens_first():
    """q as a (B, H, T, Dh) view of (B, T, H, Dh), k and v from a wider buffer: strides, not copies."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 33, 3, 72, generator=g).transpose(1, 2)
    kv = torch.randn(2, 3, 40, 2 * 72 + 8, generator=g)
    k, v = kv[..., :72], kv[..., 80:152]
    out = native_attention(q, k, v, tokens_first=True)  # (B, T, H, Dh)
    torch.testing.assert_close(out, attention_ref(q, k, v).transpose(1, 2), rtol=1e-5, atol=1e-5)


@native
def test_native_large_logits_stay_finite():
    qkv = packed_qkv(1, 1, 40, 64, torch.float32, seed=4)
    qkv[:, :, 0] *= 100.0
    qkv[:, :, 1] *= 100.0
    q, k, v = split(qkv)
    out = native_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_ref(q.double(), k.double(), v.double()).float(), rtol=1e-4, atol=1e-4)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_nan_stays_in_its_row(dtype):
    qkv = packed_qkv(2, 2, 40, 64, torch.float32, seed=5)
    qkv[0, 7, 0, 1, 3] = float("nan")  # one query row of batch 0, head 1
    qkv[1, 9, 1, 0, 0] = float("nan")  # one key of batch 1, head 0: poisons that head only
    qkv = qkv.to(dtype)
    q, k, v = split(qkv)
    out = native_attention(q, k, v, tokens_first=True)  # (B, T, H, Dh)
    bad = torch.zeros(2, 40, 2, dtype=torch.bool)
    bad[0, 7, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()
    ref_hi, ref_lp = (r.transpose(1, 2) for r in references(q, k, v))
    assert_within_tolerance(out[~bad], ref_hi[~bad], ref_lp[~bad], fp32_floor(ref_hi[~bad]), "rows without NaN")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    q, k, v = split(packed_qkv(2, 3, 200, 72, dtype, seed=6))
    first = native_attention(q, k, v, tokens_first=True)
    assert all(torch.equal(first, native_attention(q, k, v, tokens_first=True)) for _ in range(3))


@native
def test_native_float64_runs_sdpa():
    q, k, v = split(packed_qkv(1, 2, 9, 16, torch.float64, seed=7))
    out = native_attention(q, k, v, tokens_first=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_ref(q, k, v).transpose(1, 2))


@native
def test_native_errors():
    q, k, v = (t.contiguous() for t in split(packed_qkv(1, 2, 8, 64, torch.float32)))
    op = torch.ops.ditengine.attention
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, T, Dh\), got 3 dimensions"):
        op(q[0], k, v, 0.1, False, True)
    with pytest.raises(RuntimeError, match="k has dtype BFloat16 but q has Float"):
        op(q, k.bfloat16(), v, 0.1, False, True)
    with pytest.raises(RuntimeError, match=r"v: the last dimension \(Dh\) must be contiguous"):
        op(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), 0.1, False, True)
    with pytest.raises(RuntimeError, match="must match q"):
        op(q, k[:, :1], v[:, :1], 0.1, False, True)
    with pytest.raises(RuntimeError, match="v .* must have k's shape"):
        op(q, k, v[:, :, :5], 0.1, False, True)
    with pytest.raises(RuntimeError, match="k and v need at least one token"):
        op(q, k[:, :, :0], v[:, :, :0], 0.1, False, True)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    q, k, v = split(packed_qkv(1, 2, 8, 32, dtype))
    torch.library.opcheck(torch.ops.ditengine.attention, (q, k, v, 0.2, True, True))
    torch.library.opcheck(torch.ops.ditengine.attention, (q.contiguous(), k.contiguous(), v.contiguous(), 0.2, False,
                                                         True))


@native
def test_native_single_rows_and_overlapping_rows():
    """A one-token q with an arbitrary token stride, and k, v expanded over tokens (stride 0): BLAS leading
    dimensions must still be valid."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 2, 1, 40, generator=g)[..., :32]  # (B, H, 1, Dh) with token stride 40 irrelevant
    q = q.as_strided(q.shape, (q.stride(0), q.stride(1), 3, 1))
    k = torch.randn(2, 2, 1, 32, generator=g).expand(2, 2, 7, 32)
    v = torch.randn(2, 2, 7, 32, generator=g)
    out = native_attention(q, k, v)
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-5, atol=1e-5)
    k1, v1 = k[:, :, :1], v[:, :, :1]  # a single key: the output is v
    torch.testing.assert_close(native_attention(q, k1, v1), v1.expand_as(q), rtol=1e-6, atol=1e-6)
