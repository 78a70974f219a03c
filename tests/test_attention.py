"""Self-attention (kernels/attention.py, csrc/attention.cpp): each property tested once, against every backend that
runs on CPU tensors (the C++ kernel, the Triton kernel through the interpreter in fp32 / fp16, SDPA as the
reference backend), under the tolerance rule; the Triton-only parts (forced launch configs, head-dim splitting)
and the native-only parts (float64, opcheck) apart; one table of bad inputs for every backend; GPU shapes."""
import functools
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ditengine.kernels import attention, attention_ref, interpreting
from ditengine.kernels.attention import AUTOTUNE_CONFIGS, CONFIG_KEYS, head_blocks

from support.backends import assert_raises_as_the_function, cpu_backends, ident, per_backend as cases_per_backend
from support.native_helpers import needs_native, triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

attn = importlib.import_module("ditengine.kernels.attention")  # the module; the package exports the function

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# The dtypes each backend runs on CPU tensors: the interpreter's bf16 is wrong (docs/numerics.md), so Triton's bf16
# runs under the gpu marker only.
CPU_DTYPES = {"native": (FP32, BF16, FP16), "triton": (FP32, FP16), "reference": (FP32, BF16, FP16)}


per_backend = functools.partial(cases_per_backend, "attention")  # (cases, backends) -> pytest params


def with_dtypes(*dtypes, backends=("native", "triton", "reference")) -> list:
    """(backend, dtype) params: each backend with those of `dtypes` it runs on CPU tensors."""
    return per_backend(lambda backend: [(d,) for d in dtypes if d in CPU_DTYPES[backend]], backends)


def references(q, k, v, softmax_scale=None):
    """(ref_hi, ref_lp) for the tolerance rule: the reference one precision above the inputs' (fp32 math for
    fp16 / bf16, fp64 for fp32, where an fp32 reference against itself would leave only the floor) and the
    same reference in the inputs' precision."""
    if q.dtype == torch.float32:
        return attention_ref(q.double(), k.double(), v.double(), softmax_scale), attention_ref(q, k, v, softmax_scale)
    return attention_ref(q, k, v, softmax_scale), attention_ref(q, k, v, softmax_scale, upcast=False)


def packed_qkv(B, H, T, Dh, dtype, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(B, T, 3, H, Dh, generator=g, device=device).to(dtype)


def split(qkv):
    return qkv.permute(2, 0, 3, 1, 4)  # q, k, v, each (B, H, T, Dh) views


def check(backend, B, H, T, Dh, dtype, device="cpu", head_split=True, config=None, separate=True, seed=0):
    """`backend` (named, never the default: on CPU that is the native kernel) against the reference from the packed
    qkv and, with `separate`, from q, k, v as views of it and, but for Triton (whose loads take any strides alike, and
    which the interpreter runs slowly), as contiguous copies, whose rows the native kernel's GEMMs read with another
    leading dimension; `config` forces one Triton launch config."""
    qkv = packed_qkv(B, H, T, Dh, dtype, device, seed)
    out = attention(qkv, head_split=head_split, backend=backend, config=config)
    assert out.shape == (B, T, H, Dh) and out.is_contiguous() and out.dtype == dtype
    q, k, v = split(qkv)
    ref_hi, ref_lp = references(q, k, v)  # (B, H, T, Dh)
    name = f"{backend} B={B} H={H} T={T} Dh={Dh} {ident(dtype)}{f' config {config}' if config else ''}"
    assert_within_tolerance(out.transpose(1, 2), ref_hi, ref_lp, fp32_floor(ref_hi), f"packed {name}")
    if separate:
        layouts = {"views": (q, k, v)}
        if backend != "triton":
            layouts["contiguous"] = tuple(t.contiguous() for t in (q, k, v))
        for layout, (q, k, v) in layouts.items():
            out = attention(q, k, v, head_split=head_split, backend=backend, config=config)
            assert out.shape == (B, H, T, Dh) and out.is_contiguous() and out.dtype == dtype
            assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), f"separate {layout} {name}")


def attend(backend, q, k, v, softmax_scale=None, tokens_first=False):
    """`backend` on (B, H, T, Dh) views of any strides, written (B, T, H, Dh) when `tokens_first`. The public
    function writes tokens-first only from a packed qkv (one T), so unequal lengths written tokens-first go to the
    backend's own entry: the registered op (its CPU kernel is the native one), Triton's launcher, or SDPA."""
    if not tokens_first:
        return attention(q, k, v, softmax_scale=softmax_scale, backend=backend)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if backend == "native":
        return torch.ops.ditengine.attention(q, k, v, scale, True, True)
    if backend == "triton":
        B, H, T, Dh = q.shape
        out = q.new_empty(B, T, H, Dh)
        attn._launch(q, k, v, out.transpose(1, 2), scale, True)
        return out
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).contiguous()


# -- every backend ------------------------------------------------------------------------------------------
# (B, H, T, Dh); T = 1, 16, 97, 256; every supported DiT-relevant head dim; interpreter-sized.
CASES = [(2, 1, 16, 32), (1, 2, 16, 64), (1, 2, 16, 72), (1, 2, 16, 96), (1, 2, 16, 128), (2, 2, 1, 72),
         (1, 2, 97, 64), (2, 1, 97, 72), (1, 1, 97, 128), (1, 1, 256, 64)]
# The native kernel's: a grid of batch, tokens (one token, a partial 64-row tile, DiT's 256) and head dims.
NATIVE_GRID = [(B, 3, T, Dh) for B in (1, 2) for Dh in (16, 64, 72, 128) for T in (1, 97, 256)]


def reference_cases(backend):
    shapes = NATIVE_GRID if backend == "native" else CASES
    return [(*shape, dtype) for shape in shapes for dtype in CPU_DTYPES[backend]]


@pytest.mark.parametrize("backend, B, H, T, Dh, dtype", per_backend(reference_cases))
def test_matches_reference(backend, B, H, T, Dh, dtype):
    check(backend, B, H, T, Dh, dtype, seed=B * 1000 + Dh * 10 + T)


# Key lengths on every edge of the forced Triton config's key blocks (BLOCK_N = 16), and for the native kernel on
# the edges of its own (csrc/softmax_rows.h: BLOCK_N = 512 keys per online-softmax step); 17 queries: a partial
# second query tile of BLOCK_M = 16. In fp32 (and bf16 on the native kernel, which widens its blocks as it loads them):
# the masking of the keys past T_K is the same code in every dtype.
EDGE_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)
EDGE_KEYS = [1, 15, 16, 17, 31, 32, 33]
NATIVE_EDGE_KEYS = [511, 512, 513]


def edge_cases(backend):
    keys = EDGE_KEYS + (NATIVE_EDGE_KEYS if backend == "native" else [])
    return [(T_K, dtype) for T_K in keys for dtype in ((FP32, BF16) if backend == "native" else (FP32,))]


@pytest.mark.parametrize("backend, T_K, dtype", per_backend(edge_cases))
def test_key_lengths_on_block_edges(backend, T_K, dtype, request):
    g = torch.Generator().manual_seed(T_K)
    q = torch.randn(1, 2, 17, 72, generator=g).to(dtype)
    k = torch.randn(1, 2, T_K, 72, generator=g).to(dtype)
    v = torch.randn(1, 2, T_K, 72, generator=g).to(dtype)
    # Only the Triton kernel takes a launch config; its launches are counted through the interpreter.
    launches = request.getfixturevalue("triton_launches") if backend == "triton" else None
    out = attention(q, k, v, backend=backend, config=EDGE_CONFIG if backend == "triton" else None)
    if launches is not None:
        assert launches["_attention_fwd_kernel"] == 1, launches
    assert out.shape == q.shape and out.dtype == dtype
    ref_hi, ref_lp = references(q, k, v)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), f"{backend} T_K={T_K} {ident(dtype)}")


@pytest.mark.parametrize("backend", cpu_backends("attention"))
def test_reads_the_qkv_projection_output_directly(backend):
    """From a real qkv Linear to the projection input, as in the DiT block, with no copies in between."""
    B, T, H, Dh = 2, 20, 2, 72
    g = torch.Generator().manual_seed(1)
    qkv_linear = torch.nn.Linear(H * Dh, 3 * H * Dh)
    with torch.no_grad():
        qkv_linear.weight.copy_(torch.randn(qkv_linear.weight.shape, generator=g) * (H * Dh) ** -0.5)
        qkv_linear.bias.copy_(torch.randn(qkv_linear.bias.shape, generator=g) * 0.1)
    x = torch.randn(B, T, H * Dh, generator=g)
    with torch.no_grad():
        qkv = qkv_linear(x).view(B, T, 3, H, Dh)
        ours = attention(qkv, backend=backend).view(B, T, H * Dh)
        q, k, v = split(qkv)
        expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("attention"))
def test_strided_views_cross_lengths_and_scale(backend):
    """q as a (B, H, T, Dh) view of (B, T, H, Dh), k and v as other views (of a wider buffer), more or fewer keys
    than queries, a custom scale; written (B, H, T, Dh) and tokens-first: strides, not copies."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 2, 64, generator=g).transpose(1, 2)
    k = torch.randn(1, 2, 37, 64, generator=g)
    v = torch.randn(1, 2, 37, 64, generator=g)
    out = attend(backend, q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(out, attention_ref(q, k, v, softmax_scale=0.3), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 33, 3, 72, generator=g).transpose(1, 2)
    kv = torch.randn(2, 3, 40, 2 * 72 + 8, generator=g)
    k, v = kv[..., :72], kv[..., 80:152]
    out = attend(backend, q, k, v, tokens_first=True)  # (B, T, H, Dh)
    assert out.shape == (2, 33, 3, 72) and out.is_contiguous()
    torch.testing.assert_close(out, attention_ref(q, k, v).transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, dtype", with_dtypes(FP32, BF16))
def test_long_keys_across_key_blocks(backend, dtype):
    """More keys than one online-softmax block (the native kernel's 512; nine 128-key blocks of the Triton kernel,
    forced: the interpreter takes 2 s with its pinned 32 x 32 tiles), unequal query / key lengths, a custom scale, and
    logits far apart so the running max changes between key blocks."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 70, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 1100, 16, generator=g)
    k[:, :, 900:] *= 4.0  # the largest logits sit in the last key block
    k = k.to(dtype)
    v = torch.randn(2, 2, 1100, 16, generator=g).to(dtype)
    config = dict(BLOCK_M=128, BLOCK_N=128) if backend == "triton" else None  # only the Triton kernel takes one
    out = attention(q, k, v, softmax_scale=0.7, backend=backend, config=config)
    ref_hi, ref_lp = references(q, k, v, softmax_scale=0.7)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), f"{backend} long keys")


@pytest.mark.parametrize("backend", cpu_backends("attention"))
def test_large_logits_stay_finite(backend):
    qkv = packed_qkv(1, 1, 40, 64, torch.float32, seed=4)
    qkv[:, :, 0] *= 100.0
    qkv[:, :, 1] *= 100.0  # logits ~ 1e4 / 8
    q, k, v = split(qkv)
    expected = attention_ref(q.double(), k.double(), v.double()).float()  # (B, H, T, Dh)
    out = attention(qkv, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-4, atol=1e-4)
    out = attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, dtype", with_dtypes(FP32, BF16))
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice encountered")
def test_nan_stays_in_its_row(backend, dtype):
    qkv = packed_qkv(2, 2, 40, 64, torch.float32, seed=5)
    qkv[0, 7, 0, 1, 3] = float("nan")  # one query row of batch 0, head 1
    qkv[1, 9, 1, 0, 0] = float("nan")  # one key of batch 1, head 0: poisons that head only
    qkv = qkv.to(dtype)
    out = attention(qkv, backend=backend)  # (B, T, H, Dh)
    bad = torch.zeros(2, 40, 2, dtype=torch.bool)
    bad[0, 7, 1] = True
    bad[1, :, 0] = True
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()
    ref_hi, ref_lp = (r.transpose(1, 2) for r in references(*split(qkv)))
    assert_within_tolerance(out[~bad], ref_hi[~bad], ref_lp[~bad], fp32_floor(ref_hi[~bad]), "rows without NaN")


def same_bits_cases(backend):
    # The interpreter in fp16 at a smaller shape (200 tokens take it 1.4 s a call); the others in fp32 and bf16 with
    # several query tiles per head, spread over the threads.
    if backend == "triton":
        return [(FP16, (1, 2, 33, 72), 2)]
    return [(dtype, (2, 3, 200, 72), 4) for dtype in (FP32, BF16)]


@pytest.mark.parametrize("backend, dtype, shape, runs", per_backend(same_bits_cases))
def test_same_inputs_same_bits(backend, dtype, shape, runs):
    qkv = packed_qkv(*shape, dtype, seed=6)
    first = attention(qkv, backend=backend)
    assert all(torch.equal(first, attention(qkv, backend=backend)) for _ in range(runs - 1))


@pytest.mark.parametrize("backend", cpu_backends("attention"))
def test_single_rows_and_overlapping_rows(backend):
    """A one-token q with an arbitrary token stride, and k, v expanded over tokens (stride 0): the native kernel's
    BLAS leading dimensions must still be valid, and every backend reads such views."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 2, 1, 40, generator=g)[..., :32]  # (B, H, 1, Dh) with token stride 40 irrelevant
    q = q.as_strided(q.shape, (q.stride(0), q.stride(1), 3, 1))
    k = torch.randn(2, 2, 1, 32, generator=g).expand(2, 2, 7, 32)
    v = torch.randn(2, 2, 7, 32, generator=g)
    out = attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-5, atol=1e-5)
    k1, v1 = k[:, :, :1], v[:, :, :1]  # a single key: the output is v
    torch.testing.assert_close(attention(q, k1, v1, backend=backend), v1.expand_as(q), rtol=1e-6, atol=1e-6)


# -- bad inputs: one table, every backend --------------------------------------------------------------------
def bad_inputs():
    qkv = packed_qkv(1, 2, 8, 64, torch.float32)
    q, k, v = (t.contiguous() for t in split(qkv))
    return SimpleNamespace(qkv=qkv, q=q, k=k, v=v, g=torch.Generator().manual_seed(21))


def strided_last(t):
    """`t` with the same shape and a last dimension of stride > 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# (description, bad call of `attention` as f(x) with x from bad_inputs(), exception type, regex naming the argument)
BAD_INPUTS = [
    ("qkv is not a tensor", lambda f, x: f(x.qkv.tolist()), TypeError, r"qkv: expected a torch\.Tensor, got list"),
    ("qkv has 3 dimensions", lambda f, x: f(x.qkv.reshape(1, 8, 384)), ValueError,
     r"qkv: expected 5 dimensions \(B, T, 3, H, Dh\), got shape \(1, 8, 384\)"),
    ("qkv dim 2 is not 3", lambda f, x: f(x.qkv[:, :, :2]), ValueError,
     r"qkv: expected shape \(B, T, 3, H, Dh\), got \(1, 8, 2, 2, 64\) \(dim 2 must be 3\)"),
    ("qkv head dim 12", lambda f, x: f(x.qkv[..., :12]), ValueError,
     r"head dim 12 is not supported: expected a multiple of 8 from 16 to 256"),
    ("qkv head dim 70", lambda f, x: f(torch.randn(1, 4, 3, 1, 70, generator=x.g)), ValueError,
     "head dim 70 is not supported"),
    ("q head dim 512", lambda f, x: f(*(torch.randn(1, 1, 2, 512, generator=x.g) for _ in range(3))), ValueError,
     "head dim 512 is not supported"),
    ("q and k without v", lambda f, x: f(x.q, x.k), ValueError, "attention: pass either qkv alone or all of q, k, v"),
    ("q has 3 dimensions", lambda f, x: f(x.q[0], x.k, x.v), ValueError,
     r"q: expected 4 dimensions \(B, H, T, Dh\), got shape \(2, 8, 64\)"),
    ("q is float64", lambda f, x: f(x.q.double(), x.k.double(), x.v.double()), TypeError,
     r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64"),
    ("q is int64", lambda f, x: f(x.q.long(), x.k.long(), x.v.long()), TypeError,
     r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got int64"),
    ("q head dim 0", lambda f, x: f(x.q[..., :0], x.k[..., :0], x.v[..., :0]), ValueError,
     r"q: the head dim must be positive, got shape \(1, 2, 8, 0\)"),
    ("q last dim strided", lambda f, x: f(strided_last(x.q), x.k, x.v), ValueError,
     r"q: the last dimension must be contiguous \(stride 1\), got strides \(1024, 512, 1, 8\)"),
    ("q has no tokens", lambda f, x: f(x.q[:, :, :0], x.k, x.v), ValueError,
     "attention: sequence length must be at least 1, got q 0, k 8"),
    ("k has 3 dimensions", lambda f, x: f(x.q, x.k[0], x.v[0]), ValueError,
     r"k: expected 4 dimensions \(B, H, T, Dh\), got shape \(2, 8, 64\)"),
    ("k has other heads", lambda f, x: f(x.q, x.k[:, :1], x.v[:, :1]), ValueError,
     r"k: batch, head count and head dim must match q \(1, 2, 8, 64\), got \(1, 1, 8, 64\)"),
    ("k has another dtype", lambda f, x: f(x.q, x.k.half(), x.v), TypeError,
     r"k: expected dtype in \['float32'\], got float16"),
    ("k on another device", lambda f, x: f(x.q, x.k.to("meta"), x.v.to("meta")), ValueError,
     "k: on meta, expected cpu like the other inputs"),
    ("k has no tokens", lambda f, x: f(x.q, x.k[:, :, :0], x.v[:, :, :0]), ValueError,
     "attention: sequence length must be at least 1, got q 8, k 0"),
    ("v has another shape", lambda f, x: f(x.q, x.k, x.v[:, :, :5]), ValueError,
     r"v: expected shape \(1, 2, 8, 64\) \(B, H, T, Dh\) like k, got \(1, 2, 5, 64\)"),
    ("v has another dtype", lambda f, x: f(x.q, x.k, x.v.bfloat16()), TypeError,
     r"v: expected dtype in \['float32'\], got bfloat16"),
    ("v last dim strided", lambda f, x: f(x.q, x.k, strided_last(x.v)), ValueError,
     "v: the last dimension must be contiguous"),
]
BAD = {row[0]: row[1:] for row in BAD_INPUTS}


@pytest.mark.parametrize("backend", [*cpu_backends("attention"), pytest.param(None, id="default")])
@pytest.mark.parametrize("call, error, match", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS])
def test_bad_inputs(backend, call, error, match):
    """Each backend (and the default) refuses a bad argument in Python with the same error, naming the argument."""
    with pytest.raises(error, match=match):
        call(lambda *args: attention(*args, backend=backend), bad_inputs())


# The same mistakes made in a direct call of the registered op: on CPU tensors its C++ kernel (csrc/attention.cpp)
# checks them, and past it (on CUDA, or on CPU without the extension) its Python body, with the public function's
# check (kernels/attention.py `check_inputs`). Each path raises the public function's exception type and names the
# argument: {description: (op call as f(x), regex of the C++ message, regex of the Python body's message or None
# for the public function's)}. What the public function refuses and the op runs on every path is left out: float64
# (SDPA), head dims outside 16..256 (the C++ GEMMs take any; the Python body runs SDPA where the Triton kernel
# cannot) and no queries (an empty output); see test_op_runs_what_only_the_function_refuses. A meta k or v beside a
# CPU q is asked of the Python body only: PyTorch's dispatcher sends a direct call with a meta tensor among CPU
# tensors to the op's fake implementation, so the C++ kernel never sees it (PyTorch's dispatch, not fought here).
OP_CALLS = {
    "q has 3 dimensions": (lambda op, x: op(x.q[0], x.k, x.v, 0.125, False, True),
                           r"ditengine::attention: q must be \(B, H, T, Dh\), got 3 dimensions", None),
    "q is int64": (lambda op, x: op(x.q.long(), x.k.long(), x.v.long(), 0.125, False, True),
                   "ditengine::attention: q must be float32, bfloat16, float16 or float64, got Long",
                   r"q: expected dtype in \['float32', 'float16', 'bfloat16', 'float64'\], got int64"),
    "q last dim strided": (lambda op, x: op(strided_last(x.q), x.k, x.v, 0.125, False, True),
                           r"ditengine::attention: q: the last dimension \(Dh\) must be contiguous", None),
    "q head dim 0": (lambda op, x: op(x.q[..., :0], x.k[..., :0], x.v[..., :0], 0.125, False, True),
                     r"ditengine::attention: q: the head dim must be positive, got shape \[1, 2, 8, 0\]", None),
    "k has 3 dimensions": (lambda op, x: op(x.q, x.k[0], x.v[0], 0.125, False, True),
                           r"ditengine::attention: k must be \(B, H, T, Dh\), got 3 dimensions", None),
    "k has other heads": (lambda op, x: op(x.q, x.k[:, :1], x.v[:, :1], 0.125, False, True),
                          r"ditengine::attention: k \[1, 1, 8, 64\] must match q \[1, 2, 8, 64\]", None),
    "k has another dtype": (lambda op, x: op(x.q, x.k.half(), x.v, 0.125, False, True),
                            "ditengine::attention: k has dtype Half but q has Float", None),
    "k on another device": (lambda op, x: op(x.q, x.k.to("meta"), x.v.to("meta"), 0.125, False, True), None, None),
    "k has no tokens": (lambda op, x: op(x.q, x.k[:, :, :0], x.v[:, :, :0], 0.125, False, True),
                        "ditengine::attention: k and v need at least one token", None),
    "v has another shape": (lambda op, x: op(x.q, x.k, x.v[:, :, :5], 0.125, False, True),
                            r"ditengine::attention: v \[1, 2, 5, 64\] must have k's shape \[1, 2, 8, 64\]", None),
    "v has another dtype": (lambda op, x: op(x.q, x.k, x.v.bfloat16(), 0.125, False, True),
                            "ditengine::attention: v has dtype BFloat16 but q has Float", None),
    "v last dim strided": (lambda op, x: op(x.q, x.k, strided_last(x.v), 0.125, False, True),
                           r"ditengine::attention: v: the last dimension \(Dh\) must be contiguous", None),
}
PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def python_body(*args):
    """The registered op's Python body, reached past its C++ CPU kernel (as on CUDA, or without the extension)."""
    return torch.ops.ditengine.attention.default.redispatch(PYTHON_BODY, *args)


@pytest.mark.parametrize("path", [pytest.param("native", marks=needs_native("attention")), "python body"])
@pytest.mark.parametrize("description", OP_CALLS)
def test_op_checks_agree_with_the_function(description, path):
    """The op's checks raise what the public function raises (csrc/checks.h; kernels/attention.py `check_inputs`),
    and name the argument too."""
    call, error, match = BAD[description]
    with pytest.raises(error, match=match):
        call(attention, bad_inputs())
    op_call, cpp_match, body_match = OP_CALLS[description]
    if path == "native" and cpp_match is None:
        pytest.skip("a meta tensor among CPU tensors goes to the op's fake implementation (PyTorch's dispatch)")
    op = torch.ops.ditengine.attention if path == "native" else python_body
    assert_raises_as_the_function(lambda: op_call(op, bad_inputs()), path, error, match, cpp_match, body_match,
                                  description)


@pytest.mark.parametrize("path, triton", [pytest.param("native", False, marks=needs_native("attention"), id="native"),
                                          pytest.param("python body", False, id="python body-sdpa"),
                                          pytest.param("python body", True, id="python body-triton")])
def test_op_runs_what_only_the_function_refuses(path, triton, monkeypatch):
    """float64, a head dim outside the Triton kernel's and no queries: the public function refuses them, the op runs
    them on every path (the C++ kernel; the Python body through SDPA, also where `use_triton` says the Triton kernel
    runs, as on CUDA: forced here, and nothing is launched) and agrees with the reference."""
    def launch(*args, **kwargs):
        raise AssertionError("the Triton kernel was launched")

    monkeypatch.setattr(attn, "use_triton", lambda op, *tensors: triton)
    monkeypatch.setattr(attn, "_launch", launch)
    op = torch.ops.ditengine.attention if path == "native" else python_body
    q, k, v = split(packed_qkv(1, 2, 9, 16, torch.float64, seed=7))
    torch.testing.assert_close(op(q, k, v, 0.3, True, True), attention_ref(q, k, v, 0.3).transpose(1, 2))
    q, k, v = split(packed_qkv(1, 2, 9, 12, torch.float32, seed=8))  # head dim 12: not a multiple of 8 from 16
    torch.testing.assert_close(op(q, k, v, 0.3, False, True), attention_ref(q, k, v, 0.3), rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 2, 0, 16)
    k = v = torch.randn(1, 2, 5, 16)
    for tokens_first in (False, True):
        out = op(q, k, v, 0.25, tokens_first, True)
        assert out.shape == ((1, 0, 2, 16) if tokens_first else (1, 2, 0, 16)), out.shape


# -- the Triton kernel only: launch configs and head-dim blocks ------------------------------------------------
@triton_cpu
@pytest.mark.parametrize("B, H, T, Dh", [(1, 1, 257, 96), (1, 1, 129, 72)])
def test_fp32_past_one_block_of_256(B, H, T, Dh):
    """The GPU fp32 shapes on CPU: T = 257 leaves one valid query row and one key in the last blocks."""
    check("triton", B, H, T, Dh, torch.float32, separate=False)


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
        check("triton", B, H, T, Dh, torch.float32, config=config, separate=False)
        assert launches == [((-(-T // config["BLOCK_M"]), B * H), config)], launches


def test_config_errors_name_the_argument():
    qkv = packed_qkv(1, 1, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                         "backend='triton', got backend=None"):
        attention(qkv, config=AUTOTUNE_CONFIGS[0])
    with pytest.raises(ValueError, match="config: only the Triton kernel takes a launch config; pass "
                                         "backend='triton', got backend='reference'"):
        attention(qkv, backend="reference", config=AUTOTUNE_CONFIGS[0])
    if not interpreting():  # backend='triton' itself is refused on CPU tensors, before its config is looked at
        return
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
    check("triton", 1, 2, 33, 72, torch.float32, head_split=False)
    assert head_blocks(72) == (64, 16) and head_blocks(72, head_split=False) == (128, 0)
    assert head_blocks(96) == (64, 32) and head_blocks(40) == (32, 16) and head_blocks(64) == (64, 0)


# -- the registered op ----------------------------------------------------------------------------------------
def test_registered_op_passes_opcheck():
    q, k, v = split(packed_qkv(1, 2, 8, 32, torch.float32))
    torch.library.opcheck(torch.ops.ditengine.attention, (q, k, v, 0.2, True, True))


# -- the native CPU kernel only (csrc/attention.cpp), called through the dispatcher ------------------------------
native = needs_native("attention")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    q, k, v = split(packed_qkv(1, 2, 8, 32, dtype))
    torch.library.opcheck(torch.ops.ditengine.attention, (q, k, v, 0.2, True, True))
    torch.library.opcheck(torch.ops.ditengine.attention, (q.contiguous(), k.contiguous(), v.contiguous(), 0.2, False,
                                                         True))


@native
def test_native_float64_runs_sdpa():
    """float64, which the public function refuses, reaches the op's CPU kernel in a direct call: it runs SDPA."""
    q, k, v = split(packed_qkv(1, 2, 9, 16, torch.float64, seed=7))
    out = torch.ops.ditengine.attention(q, k, v, 16 ** -0.5, True, True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_ref(q, k, v).transpose(1, 2))


# -- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [256, 1024, 4096])
@pytest.mark.parametrize("Dh, head_split", [(72, True), (72, False), (64, True)])
def test_gpu_dit_shapes(T, Dh, head_split, dtype):
    check("triton", 2 if T < 4096 else 1, 16, T, Dh, dtype, "cuda", head_split)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, T, Dh", [(1, 2, 97, 32), (3, 2, 257, 96), (2, 4, 1, 128), (1, 1, 129, 72)])
def test_gpu_odd_shapes_fp32(B, H, T, Dh):
    check("triton", B, H, T, Dh, torch.float32, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T, Dh", [(1024, 72), (97, 64)])
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS,
                         ids=lambda c: "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_gpu_every_autotune_config(config, T, Dh, dtype):
    """The suite pins one config (DITENGINE_AUTOTUNE=0); the autotuner may pick any of these on a real run."""
    check("triton", 2, 16, T, Dh, dtype, "cuda", config=config)
