"""Cross-attention to a right-padded caption (kernels/cross_attention.py, csrc/cross_attention.cpp): the Triton
kernel through the interpreter (fp32, fp16), the native CPU kernel (fp32, bf16, fp16), both against the
reference under the tolerance rule; lengths 1, full and mixed per row; keys past a row's length never read;
a NaN kept in its row; error paths; the op's fake implementation and opcheck; PixArt shapes on a GPU."""
import functools
import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import choose, cross_attention, cross_attention_ref, interpreting
from ditengine.kernels.attention import AUTOTUNE_CONFIGS

from support.native_helpers import needs_native, run_python, triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

xattn = importlib.import_module("ditengine.kernels.cross_attention")  # the module; the package exports the function


def make_inputs(B, Tq, H, Dh, L, lens, dtype, device="cpu", seed=0, q_pad=8):
    """q (B, Tq, H, Dh) as a per-head view of a projection output with `q_pad` more columns (token stride
    H*Dh + q_pad: a strided view, as a fused projection gives), kv (B, L, 2, H, Dh) as a view of the k/v
    projection's (B, L, 2*H*Dh) output, and kv_lens (B,) int64."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, Tq, H * Dh + q_pad, generator=g).to(device=device, dtype=dtype)
    q = proj[..., q_pad:].unflatten(-1, (H, Dh))
    kv = torch.randn(B, L, 2 * H * Dh, generator=g).to(device=device, dtype=dtype).view(B, L, 2, H, Dh)
    return q, kv, torch.tensor(lens, device=device)


def references(q, kv, kv_lens, softmax_scale=None):
    """(ref_hi, ref_lp) for the tolerance rule: fp32 inputs against the reference on float64 copies (ref_lp the
    fp32 reference); fp16 / bf16 against the fp32-math reference (ref_lp the reference in the inputs' dtype)."""
    if q.dtype == torch.float32:
        return (cross_attention_ref(q.double(), kv.double(), kv_lens, softmax_scale),
                cross_attention_ref(q, kv, kv_lens, softmax_scale))
    return (cross_attention_ref(q, kv, kv_lens, softmax_scale),
            cross_attention_ref(q, kv, kv_lens, softmax_scale, upcast=False))


def check(out, q, kv, kv_lens, name, softmax_scale=None):
    B, Tq, H, Dh = q.shape
    assert out.shape == (B, Tq, H, Dh) and out.is_contiguous() and out.dtype == q.dtype, name
    ref_hi, ref_lp = references(q, kv, kv_lens, softmax_scale)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), name)


def poison_padding(kv, kv_lens, value):
    """kv with `value` in every key and value past each row's length."""
    kv = kv.clone()
    for b, n in enumerate(kv_lens.tolist()):
        kv[b, n:] = value
    return kv


# -- the Triton kernel (on CPU: the interpreter) ------------------------------------------------------------
# (B, Tq, H, Dh, L, lens): one key, full rows, mixed rows, odd Tq and L, head dims 72 (64 + 16), 64 and 16; one
# row past several 32-key blocks. Interpreter-sized: the pinned interpreter tiles are 32 x 32.
TRITON_CASES = [(2, 33, 1, 72, 40, [40, 1]), (2, 20, 2, 64, 7, [3, 7]), (1, 16, 2, 16, 120, [120]),
                (3, 9, 1, 72, 97, [97, 33, 1])]


@triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B, Tq, H, Dh, L, lens", TRITON_CASES)
def test_triton_matches_reference(B, Tq, H, Dh, L, lens, dtype, triton_launches):
    q, kv, kv_lens = make_inputs(B, Tq, H, Dh, L, lens, dtype, seed=Dh + L)
    out = cross_attention(q, kv, kv_lens, backend="triton")
    assert triton_launches["_attention_fwd_kernel"] == 1
    check(out, q, kv, kv_lens, f"triton B={B} Tq={Tq} H={H} Dh={Dh} L={L} lens={lens}")


@triton_cpu
def test_triton_runs_only_the_valid_key_blocks(monkeypatch):
    """The key loop stops at cdiv(len_b, BLOCK_N) blocks: counted as the interpreter's loads of a k tile,
    shaped (Dh, BLOCK_N), one per key block. Lengths 1, one block exactly, one past it, and the full L."""
    from triton.runtime.interpreter import InterpreterBuilder

    k_tiles = []
    load = InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, *args, **kwargs):
        k_tiles.append(tuple(ptrs.data.shape) == (64, 32))
        return load(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    q, kv, kv_lens = make_inputs(4, 32, 1, 64, 300, [1, 32, 33, 300], torch.float32, seed=1)  # one query tile
    out = cross_attention(q, kv, kv_lens, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=32))
    assert sum(k_tiles) == 1 + 1 + 2 + 10, sum(k_tiles)
    check(out, q, kv, kv_lens, "block counts")


@triton_cpu
def test_triton_forced_config_with_lengths_on_block_edges():
    """BLOCK_N = 16 with lengths of exactly one block, one past it, and one short of three blocks."""
    q, kv, kv_lens = make_inputs(4, 21, 1, 72, 47, [16, 17, 47, 1], torch.float32, seed=2)
    out = cross_attention(q, kv, kv_lens, backend="triton", config=dict(BLOCK_M=16, BLOCK_N=16))
    check(out, q, kv, kv_lens, "BLOCK_M=16 BLOCK_N=16")


@triton_cpu
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_triton_ignores_the_padding_and_keeps_nan_in_its_row():
    """NaN and 1e30 past the lengths change nothing; a NaN query row stays in its row; a NaN in a valid key
    poisons that (batch, head) only, as in the reference."""
    q, kv, kv_lens = make_inputs(2, 12, 2, 64, 40, [17, 1], torch.float32, seed=3)
    clean = cross_attention(q, kv, kv_lens, backend="triton")
    for value in (float("nan"), 1e30):
        assert torch.equal(cross_attention(q, poison_padding(kv, kv_lens, value), kv_lens, backend="triton"), clean)
    q, kv = q.clone(), poison_padding(kv, kv_lens, float("nan"))
    q[0, 7, 1, 3] = float("nan")  # one query row of batch 0, head 1
    kv[1, 0, 0, 0, 5] = float("nan")  # the only valid key of batch 1, head 0
    out = cross_attention(q, kv, kv_lens, backend="triton")
    bad = torch.zeros(2, 12, 2, dtype=torch.bool)
    bad[0, 7, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    torch.testing.assert_close(out[~bad], clean[~bad], rtol=0, atol=0)


@triton_cpu
def test_triton_scale_int32_lengths_and_strided_lengths():
    q, kv, kv_lens = make_inputs(3, 10, 1, 16, 9, [2, 9, 5], torch.float32, seed=4)
    lens32 = torch.tensor([[2, 0], [9, 0], [5, 0]], dtype=torch.int32)[:, 0]  # stride 2
    out = cross_attention(q, kv, lens32, softmax_scale=0.7, backend="triton")
    check(out, q, kv, kv_lens, "scale 0.7, int32 strided lengths", softmax_scale=0.7)


# -- the native CPU kernel (csrc/cross_attention.cpp) ------------------------------------------------------
native = needs_native("cross_attention")
NATIVE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# PixArt-like (L = 300, a caption of 20 and a negative prompt of 1), full and mixed rows, a single query and
# a single key, odd Tq, and rows of more keys than one 512-key block (the online softmax across blocks).
NATIVE_CASES = [(2, 97, 3, 72, 300, [20, 1]), (2, 64, 2, 64, 120, [120, 57]), (1, 1, 2, 16, 7, [7]),
                (3, 33, 2, 72, 7, [1, 7, 4]), (2, 130, 2, 16, 1100, [1100, 513])]


def native_op(q, kv, kv_lens, softmax_scale=None):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.ops.ditengine.cross_attention(q, kv, kv_lens, scale)


@native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("B, Tq, H, Dh, L, lens", NATIVE_CASES)
def test_native_matches_reference(B, Tq, H, Dh, L, lens, dtype):
    q, kv, kv_lens = make_inputs(B, Tq, H, Dh, L, lens, dtype, seed=Tq + L)
    if L > 512:  # the largest logits in the last key block: the running max changes between blocks
        kv[:, 900:, 0] *= 4.0
    check(native_op(q, kv, kv_lens), q, kv, kv_lens, f"native B={B} Tq={Tq} H={H} Dh={Dh} L={L} lens={lens}")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_is_the_default_on_cpu(dtype, monkeypatch):
    """With the extension built, `cross_attention` on CPU tensors is the C++ kernel and nothing else: neither
    the op's Python body (SDPA) nor the reference runs, and no attention op of ATen shows in the profile."""
    assert choose("cross_attention", torch.device("cpu")) == "native"
    q, kv, kv_lens = make_inputs(2, 40, 2, 72, 30, [9, 1], dtype, seed=5)
    expected = native_op(q, kv, kv_lens)

    def fail(*args, **kwargs):
        raise AssertionError("the Python implementation ran")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fail)
    monkeypatch.setattr(xattn, "cross_attention_ref", fail)
    with torch.profiler.profile() as prof:
        out = cross_attention(q, kv, kv_lens)
    names = {e.name for e in prof.events()}
    assert "ditengine::cross_attention" in names, names
    assert not [n for n in names if any(w in n for w in ("attention", "softmax", "einsum", "bmm", "masked"))
                and not n.startswith("ditengine::")], names
    assert torch.equal(out, expected)
    assert torch.equal(cross_attention(q, kv, kv_lens, backend="native"), expected)


@native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_native_ignores_the_padding_and_keeps_nan_in_its_row(dtype):
    q, kv, kv_lens = make_inputs(2, 70, 2, 72, 40, [17, 1], dtype, seed=6)
    clean = native_op(q, kv, kv_lens)
    for value in (float("nan"), 1e30 if dtype == torch.float32 else 6e4):
        assert torch.equal(native_op(q, poison_padding(kv, kv_lens, value), kv_lens), clean), value
    q, kv = q.clone(), poison_padding(kv, kv_lens, float("nan"))
    q[0, 66, 1, 3] = float("nan")  # one query row of batch 0, head 1 (in the second 64-row tile)
    kv[1, 0, 0, 0, 5] = float("nan")  # the only valid key of batch 1, head 0
    out = native_op(q, kv, kv_lens)
    bad = torch.zeros(2, 70, 2, dtype=torch.bool)
    bad[0, 66, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.equal(out[~bad], clean[~bad])


@native
def test_native_one_key_gives_its_value():
    """A one-token prompt (the negative prompt): softmax over one key is 1, so every query row is that value."""
    q, kv, kv_lens = make_inputs(2, 9, 3, 64, 120, [1, 1], torch.float32, seed=7)
    out = native_op(q, kv, kv_lens)
    assert torch.equal(out, kv[:, :1, 1].expand_as(out))


@native
def test_native_lengths_dtypes_strides_scale_and_float64():
    q, kv, kv_lens = make_inputs(3, 10, 2, 16, 9, [2, 9, 5], torch.float32, seed=8)
    lens32 = torch.tensor([[2, 0], [9, 0], [5, 0]], dtype=torch.int32)[:, 0]  # int32, stride 2
    out = native_op(q, kv, lens32, softmax_scale=0.7)
    check(out, q, kv, kv_lens, "scale 0.7, int32 strided lengths", softmax_scale=0.7)
    assert torch.equal(out, native_op(q, kv, kv_lens, softmax_scale=0.7))
    out64 = native_op(q.double(), kv.double(), kv_lens)  # float64: SDPA with the mask, as the Python body
    assert out64.dtype == torch.float64 and out64.is_contiguous()
    torch.testing.assert_close(out64, cross_attention_ref(q.double(), kv.double(), kv_lens))
    # Rows overlapping in memory (a token stride of 0) are materialised for BLAS.
    q1 = q[:, :1].expand(3, 10, 2, 16)
    kv1 = kv[:, :1].expand(3, 9, 2, 2, 16)
    torch.testing.assert_close(native_op(q1, kv1, kv_lens), cross_attention_ref(q1, kv1, kv_lens), rtol=1e-6,
                               atol=1e-6)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    q, kv, kv_lens = make_inputs(2, 200, 3, 72, 300, [120, 1], dtype, seed=9)
    first = native_op(q, kv, kv_lens)
    assert all(torch.equal(first, native_op(q, kv, kv_lens)) for _ in range(3))


@native
def test_native_errors_name_the_argument():
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32)
    op = torch.ops.ditengine.cross_attention
    with pytest.raises(ValueError, match=r"q must be \(B, Tq, H, Dh\), got 3 dimensions"):
        op(q[0], kv, kv_lens, 0.1)
    with pytest.raises(ValueError, match=r"kv must be \(B, L, 2, H, Dh\) with q's batch, heads and head dim "
                                         r"\(2, \*, 2, 2, 16\), got shape \[2, 7, 2, 1, 16\]"):
        op(q, kv[:, :, :, :1], kv_lens, 0.1)
    with pytest.raises(ValueError, match=r"kv_lens must be \(B,\) = \(2,\), got shape \[3\]"):
        op(q, kv, torch.tensor([1, 2, 3]), 0.1)
    with pytest.raises(TypeError, match="kv has dtype BFloat16 but q has Float"):
        op(q, kv.bfloat16(), kv_lens, 0.1)
    with pytest.raises(TypeError, match="kv_lens must be int32 or int64, got Float"):
        op(q, kv, kv_lens.float(), 0.1)
    with pytest.raises(TypeError, match="q must be float32, bfloat16, float16 or float64, got Long"):
        op(q.long(), kv.long(), kv_lens, 0.1)
    with pytest.raises(ValueError, match=r"q: the last dimension \(Dh\) must be contiguous"):
        op(q.transpose(2, 3).contiguous().transpose(2, 3), kv, kv_lens, 0.1)
    with pytest.raises(ValueError, match=r"kv: the last dimension \(Dh\) must be contiguous"):
        op(q, kv.transpose(3, 4).contiguous().transpose(3, 4), kv_lens, 0.1)
    for bad in ([0, 7], [3, 8]):
        with pytest.raises(ValueError, match=rf"kv_lens: expected values in \[1, 7\] \(the valid keys of each row\), "
                                             rf"got \[{min(bad)}, {max(bad)}\]"):
            op(q, kv, torch.tensor(bad), 0.1)
    with pytest.raises(ValueError, match=r"kv needs at least one key \(L = 0\)"):
        op(q, kv[:, :0], kv_lens.clamp(max=0), 0.1)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], dtype)
    torch.library.opcheck(torch.ops.ditengine.cross_attention, (q, kv, kv_lens, 0.3))


# -- the public function, the op and its fake implementation ------------------------------------------------
@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_errors_name_the_argument(backend):
    """Every backend checks its arguments in Python first (on CUDA too, where the C++ checks never run)."""
    if backend == "triton" and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    cross_attention = functools.partial(xattn.cross_attention, backend=backend)
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32)
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions \(B, Tq, H, Dh\), got shape \(2, 5, 32\)"):
        cross_attention(q.flatten(2), kv, kv_lens)
    with pytest.raises(ValueError, match=r"kv: expected shape \(2, \*, 2, 2, 16\) \(B, L, 2, H, Dh\)"):
        cross_attention(q, kv[:, :, :1], kv_lens)
    with pytest.raises(ValueError, match=r"kv: expected shape \(2, \*, 2, 2, 16\)"):
        cross_attention(q, kv[:1], kv_lens)
    with pytest.raises(TypeError, match=r"kv: expected dtype in \['float32'\], got float16"):
        cross_attention(q, kv.half(), kv_lens)
    with pytest.raises(TypeError, match=r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64"):
        cross_attention(q.double(), kv.double(), kv_lens)
    with pytest.raises(TypeError, match=r"kv_lens: expected dtype in \['int32', 'int64'\], got float32"):
        cross_attention(q, kv, kv_lens.float())
    with pytest.raises(ValueError, match=r"kv_lens: expected shape \(2\) \(B,\): valid keys per row, got \(1,\)"):
        cross_attention(q, kv, kv_lens[:1])
    with pytest.raises(ValueError, match="kv: on meta, expected cpu like the other inputs"):
        cross_attention(q, kv.to("meta"), kv_lens)
    with pytest.raises(ValueError, match="kv_lens: on meta, expected cpu like the other inputs"):
        cross_attention(q, kv, kv_lens.to("meta"))
    for bad in ([0, 7], [3, 8], [-1, 2]):
        with pytest.raises(ValueError, match=rf"kv_lens: expected values in \[1, 7\] \(the valid keys of each row\), "
                                             rf"got \[{min(bad)}, {max(bad)}\]"):
            cross_attention(q, kv, torch.tensor(bad))
    with pytest.raises(ValueError, match="q: the last dimension must be contiguous"):
        cross_attention(q.transpose(2, 3).contiguous().transpose(2, 3), kv, kv_lens)
    with pytest.raises(ValueError, match="kv: the last dimension must be contiguous"):
        cross_attention(q, kv.transpose(3, 4).contiguous().transpose(3, 4), kv_lens)
    q12, kv12, _ = make_inputs(2, 5, 2, 12, 7, [3, 7], torch.float32)
    with pytest.raises(ValueError, match=r"head dim 12 is not supported: expected a multiple of 8 from 16 to 256"):
        cross_attention(q12, kv12, kv_lens)
    with pytest.raises(ValueError, match="sequence lengths must be at least 1, got q 0, kv 7"):
        cross_attention(q[:, :0], kv, kv_lens)
    if backend is None:
        with pytest.raises(ValueError, match="backend: expected one of"):
            xattn.cross_attention(q, kv, kv_lens, backend="cuda")
        with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                             "backend='triton', got backend=None"):
            cross_attention(q, kv, kv_lens, config=AUTOTUNE_CONFIGS[0])
    if backend == "triton":
        with pytest.raises(ValueError, match="config: BLOCK_N must be a power of two >= 16, got 48"):
            cross_attention(q, kv, kv_lens, config=dict(BLOCK_M=32, BLOCK_N=48))


def test_reference_backend_and_fake_implementation():
    q, kv, kv_lens = make_inputs(2, 5, 2, 16, 7, [3, 7], torch.float32)
    assert torch.equal(cross_attention(q, kv, kv_lens, backend="reference"), cross_attention_ref(q, kv, kv_lens))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.ditengine.cross_attention(mode.from_tensor(q), mode.from_tensor(kv),
                                                   mode.from_tensor(kv_lens), 0.25)
    assert fake.shape == q.shape and fake.dtype == q.dtype and fake.is_contiguous()
    meta = torch.ops.ditengine.cross_attention(q.to("meta"), kv.to("meta"), kv_lens.to("meta"), 0.25)
    assert meta.shape == q.shape and meta.device.type == "meta"


@pytest.mark.parametrize("triton", [False, True], ids=["sdpa", "triton"])
def test_python_body_matches_reference(triton, monkeypatch):
    """The op's Python implementation, reached past the native CPU kernel: SDPA with a boolean key mask (the
    fallback, and the CPU path without the extension or the interpreter), or the Triton kernel where
    `use_triton` says so (CUDA; here the interpreter)."""
    if triton and not interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setattr(xattn, "use_triton", lambda op, *tensors: triton)
    q, kv, kv_lens = make_inputs(2, 11, 2, 72, 30, [30, 1], torch.float32, seed=10)
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out = torch.ops.ditengine.cross_attention.default.redispatch(python_impl, q, kv, kv_lens, 72**-0.5)
    check(out, q, kv, kv_lens, f"python body ({'triton' if triton else 'sdpa'})")


def test_registered_op_passes_opcheck():
    q, kv, kv_lens = make_inputs(1, 4, 2, 16, 6, [4], torch.float32)
    torch.library.opcheck(torch.ops.ditengine.cross_attention, (q, kv, kv_lens, 0.25))


def test_triton_kernel_compiles_for_the_h100_without_a_gpu():
    """ptxas from Triton's wheel (as bench/sm90.py does for the other kernels): the GPU's pinned bf16 and fp32
    launches compile for sm_90, bf16 dots on warpgroup tensor cores, nothing spilled, shared memory fits."""
    out = run_python("""
        import json
        from ditengine.bench.sm90 import SHARED_LIMIT, attention_case, resources
        rows = []
        for dtype in ("bf16", "fp32"):
            kernel = attention_case(dtype, 72, key_lens=True)
            rows.append(dict(dtype=dtype, limit=SHARED_LIMIT, **resources(kernel)))
        print(json.dumps(rows))
    """, TRITON_INTERPRET="0")
    rows = json.loads(out.strip().splitlines()[-1])
    for row in rows:
        assert row["local_bytes"] == 0 and row["shared_bytes"] <= row["limit"], row
    assert [row["wgmma"] for row in rows] == [True, False], rows


# -- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Tq, L, lens", [(4096, 300, [20, 1]), (1024, 120, [120, 57]), (97, 300, [300, 1])])
def test_gpu_pixart_shapes(Tq, L, lens, dtype):
    q, kv, kv_lens = make_inputs(2, Tq, 16, 72, L, lens, dtype, "cuda", seed=Tq)
    assert choose("cross_attention", q.device) == "triton"
    check(cross_attention(q, kv, kv_lens), q, kv, kv_lens, f"cuda Tq={Tq} L={L} lens={lens}")
    for value in (float("nan"), 6e4):  # the padding is never read
        assert torch.equal(cross_attention(q, poison_padding(kv, kv_lens, value), kv_lens),
                           cross_attention(q, kv, kv_lens))


@pytest.mark.gpu
@pytest.mark.parametrize("B, Tq, H, Dh, L, lens", [(2, 97, 2, 64, 7, [3, 7]), (3, 257, 2, 72, 300, [300, 21, 1])])
def test_gpu_odd_shapes_fp32(B, Tq, H, Dh, L, lens):
    q, kv, kv_lens = make_inputs(B, Tq, H, Dh, L, lens, torch.float32, "cuda")
    check(cross_attention(q, kv, kv_lens), q, kv, kv_lens, f"cuda fp32 Tq={Tq} L={L}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS,
                         ids=lambda c: "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_gpu_every_autotune_config(config):
    q, kv, kv_lens = make_inputs(2, 1024, 16, 72, 300, [20, 1], torch.bfloat16, "cuda")
    check(cross_attention(q, kv, kv_lens, backend="triton", config=config), q, kv, kv_lens, f"config {config}")
