"""GQA attention with a fused q/k RMSNorm + RoPE prologue and a sliding window (kernels/gqa_attention.py,
csrc/gqa_attention.cpp): the reference (and every kernel here) against diffusers' own `AceStepAttention`; each
kernel against the reference under the tolerance rule, as one test parametrised over the backend (the Triton
kernel through the interpreter in fp32 and fp16, the native CPU kernel in fp32, bf16 and fp16, each skipped with
its reason where it cannot run), over GQA ratios 1, 2 and 4, odd T and S, cross-attention (S != T), windows that
cut and that do not, both RoPE forms, q, k, v as strided views of one fused projection; every window from 0 to
two key blocks and the windows on the sequence's edge (T - 2 .. T + 1); only the key blocks inside the band
visited; NaN isolation; one table of bad inputs against every backend and against the op's C++ checks; opcheck
and the fake implementation; the native ISA variants; the Triton kernel compiled for the H100 without a GPU;
ACE-Step shapes on a GPU. Joint attention (SD3.5, Flux.1): (2, Dh) per-stream norm weights split at
norm_split, against diffusers' RMSNorm modules, `apply_rotary_emb` and `FluxPosEmbed`; splits inside a tile and
on tile and key-block edges; NaN isolation, error paths and opcheck with a split. Ring attention: the log-sum-exp
(return_lse) of every kernel against the reference's, zero-key shards (out 0, lse -inf), key blocks merged with
`merge_attention` against the whole sequence, the merge's -inf and NaN edges and its trace without host syncs, the
lse op's checks, Python body and opcheck."""
import functools
import importlib
import json
import math
import re
from typing import Callable, NamedTuple
from unittest import mock

import pytest
import torch

from ditengine.kernels import choose, gqa_attention, gqa_attention_ref, merge_attention
from ditengine.kernels.attention import AUTOTUNE_CONFIGS, PINNED_INTERPRETER

from support.backends import cpu_backends
from support.native_helpers import isa_runner, needs_native, run_python, skip_unless_cpu_runs, triton_cpu
from support.tolerance import assert_within_tolerance, fp32_floor

gqa = importlib.import_module("ditengine.kernels.gqa_attention")  # the module; the package exports the function


# -- inputs and references -----------------------------------------------------------------------------------
def make_inputs(B, T, S, HQ, HKV, Dh, dtype, seed=0, device="cpu"):
    """q (B, T, Hq, Dh), k, v (B, S, Hkv, Dh). Self-attention (S == T): column views of one fused projection
    output (B, T, (Hq + 2*Hkv)*Dh), as ACE-Step's; cross-attention: q a view of a wider (B, T, Hq*Dh + 8)
    output, k and v the halves of a packed (B, S, 2*Hkv*Dh) one."""
    g = torch.Generator().manual_seed(seed)
    if S == T:
        proj = torch.randn(B, T, (HQ + 2 * HKV) * Dh, generator=g).to(device=device, dtype=dtype)
        q, k, v = proj.split([HQ * Dh, HKV * Dh, HKV * Dh], dim=-1)
    else:
        q = torch.randn(B, T, HQ * Dh + 8, generator=g).to(device=device, dtype=dtype)[..., 8:]
        k, v = torch.randn(B, S, 2 * HKV * Dh, generator=g).to(device=device, dtype=dtype).chunk(2, dim=-1)
    return q.unflatten(-1, (HQ, Dh)), k.unflatten(-1, (HKV, Dh)), v.unflatten(-1, (HKV, Dh))


def norm_weights(Dh, dtype, seed=1, device="cpu"):
    """Two (Dh,) RMSNorm weights near 1, as trained ones are, in the activations' dtype (as the model holds them)."""
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(2, Dh, generator=g)).to(device=device, dtype=dtype).unbind(0)


def rope_tables(T, Dh, interleaved=False, theta=1e4, device="cpu"):
    """cos, sin (T, Dh) fp32 as diffusers' `get_1d_rotary_pos_embed(Dh, arange(T), theta, use_real=True,
    repeat_interleave_real=interleaved)` builds them: each angle twice, in the pairing its RoPE form reads."""
    freqs = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)  # (T, Dh/2)
    if interleaved:
        return angles.cos().repeat_interleave(2, -1).to(device), angles.sin().repeat_interleave(2, -1).to(device)
    return torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device)


def options(q, norm="qk", rope=None, window=None):
    """The keyword arguments of a case: norm "qk", "q" or ""; rope None, "half" or "pairs"; a window."""
    w_q, w_k = norm_weights(q.shape[-1], q.dtype, device=q.device)
    kw = dict(q_norm=w_q if "q" in norm else None, k_norm=w_k if "k" in norm else None, window=window)
    if rope is not None:
        kw.update(rope=rope_tables(q.shape[1], q.shape[-1], rope == "pairs", device=q.device),
                  rope_interleaved=rope == "pairs")
    return kw


def references(q, k, v, **kw):
    """(ref_hi, ref_lp) for the tolerance rule: fp32 inputs against the reference on float64 copies (ref_lp the
    fp32 reference); fp16 / bf16 against the fp32-math reference (ref_lp: the eager model's roundings in the
    inputs' dtype)."""
    if q.dtype == torch.float32:
        return gqa_attention_ref(q.double(), k.double(), v.double(), **kw), gqa_attention_ref(q, k, v, **kw)
    return gqa_attention_ref(q, k, v, **kw), gqa_attention_ref(q, k, v, upcast=False, **kw)


def check(out, q, k, v, name, **kw):
    B, T, HQ, Dh = q.shape
    assert out.shape == (B, T, HQ, Dh) and out.is_contiguous() and out.dtype == q.dtype, name
    ref_hi, ref_lp = references(q, k, v, **kw)
    assert_within_tolerance(out, ref_hi, ref_lp, fp32_floor(ref_hi), name)


def visible(T, window, device="cpu"):
    """(T, T) bool: query i sees key j."""
    return gqa.band_mask(T, T, window if window is not None else T, device)


# -- the backend axis -------------------------------------------------------------------------------------------
def native_op(q, k, v, q_norm=None, k_norm=None, eps=1e-6, rope=None, rope_interleaved=False, window=None,
              scale=None, norm_split=None, python_body=False, return_lse=False):
    """The registered op called directly with `gqa_attention`'s keywords: on CPU tensors, where the extension
    serves it, the C++ kernel behind its own checks (none of the Python ones); with `python_body`, the op's Python
    body past the C++ kernel (its reference branch: what runs on CPU without the extension; on CUDA the body's
    Triton branch behind the same checks). `return_lse`: the op with the log-sum-exp, `gqa_attention_lse`."""
    cos, sin = rope if rope is not None else (None, None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, q_norm, k_norm, eps, cos, sin, rope_interleaved, window, scale, norm_split)
    op = torch.ops.ditengine.gqa_attention_lse if return_lse else torch.ops.ditengine.gqa_attention
    if not python_body:
        return op(*args)
    with mock.patch.object(gqa, "use_triton", lambda *tensors: False):
        return op.default.redispatch(PYTHON_BODY, *args)


PYTHON_BODY = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def runner(backend):
    """`gqa_attention`'s call on one backend: the native kernel as the op itself (as its tests always called it),
    the Triton kernel through the interpreter, or the reference backend."""
    return native_op if backend == "native" else functools.partial(gqa_attention, backend=backend)


def backend_cases(cases: dict) -> list:
    """pytest params (backend, *case) for each backend in `cases` with each of its cases (tuples): a backend's
    skip mark and reason (`cpu_backends`) on each of its cases."""
    params = []
    for p in cpu_backends("gqa_attention", tuple(cases)):
        backend = p.values[0]
        for case in cases[backend]:
            params.append(pytest.param(backend, *case, marks=p.marks, id="-".join(map(str, (backend, *case)))))
    return params


def count_launches(backend, request):
    """The Triton kernel's launch counter (conftest's `triton_launches`) when `backend` is "triton", else None:
    requested only there, since it skips a test where the interpreter is off."""
    return request.getfixturevalue("triton_launches") if backend == "triton" else None


# -- the reference against diffusers ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_backends("gqa_attention"))
@pytest.mark.parametrize("cross, window, heads, kv_heads", [(False, None, 4, 2), (False, 4, 4, 2), (False, 4, 2, 2),
                                                            (True, None, 4, 2), (True, None, 4, 1)],
                         ids=["self", "self-window", "self-window-mha", "cross", "cross-mqa"])
def test_every_backend_matches_diffusers_ace_step_attention(cross, window, heads, kv_heads, backend):
    """diffusers' `AceStepAttention` (random weights, norm weights too) with its own RoPE tables and band mask:
    the projections around `gqa_attention` give the module's output, rel err <= 1e-5 in fp32, from the
    reference and from every kernel this machine runs (Dh = 16: the smallest head the kernels take)."""
    ace = pytest.importorskip("diffusers.models.transformers.ace_step_transformer")
    torch.manual_seed(0)
    hidden, Dh, B, T, S = 48, 16, 2, 21, 9
    module = ace.AceStepAttention(hidden, heads, kv_heads, Dh, sliding_window=window, is_cross_attention=cross).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * hidden**-0.5)
    h, enc = torch.randn(B, T, hidden), torch.randn(B, S, hidden)
    with torch.no_grad():
        if cross:
            expected = module(h, encoder_hidden_states=enc)
        else:
            rope = ace._ace_step_rotary_freqs(T, Dh, 1e6, h.device, h.dtype)
            mask = None if window is None else ace._create_4d_mask(T, h.dtype, h.device, sliding_window=window,
                                                                    is_sliding_window=True, is_causal=False)
            expected = module(h, attention_mask=mask, image_rotary_emb=rope)
        kv_in = enc if cross else h
        q = module.to_q(h).unflatten(-1, (heads, Dh))
        k = module.to_k(kv_in).unflatten(-1, (kv_heads, Dh))
        v = module.to_v(kv_in).unflatten(-1, (kv_heads, Dh))
        kw = dict(q_norm=module.norm_q.weight, k_norm=module.norm_k.weight, eps=module.norm_q.eps, scale=module.scaling)
        if not cross:
            kw.update(rope=rope, window=window)
        out = gqa_attention(q, k, v, backend=backend, **kw)
        ours = module.to_out[0](out.flatten(2))
        rel = ((ours - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-5, f"{backend}: rel err {rel:.2e}"
    if window is not None:  # the band does cut: without it the output differs
        with torch.no_grad():
            unbanded = module.to_out[0](gqa_attention_ref(q, k, v, **{**kw, "window": None}).flatten(2))
        assert ((unbanded - expected).abs().max() / expected.abs().max()).item() > 1e-2


# -- each kernel against the reference ----------------------------------------------------------------------------
native = needs_native("gqa_attention")
NATIVE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETER_DTYPES = [torch.float32, torch.float16]  # the interpreter's tl.dot: numpy has no bf16
# (B, T, S, Hq, Hkv, Dh, norm, rope, window), interpreter-sized (the pinned tiles are 32 x 32), on every kernel:
# self-attention with both RoPE forms, windows that cut (4 at T >= 20) and one that does not (30 at T = 20), the
# split head dim 72 (64 + 16); cross-attention (S != T, no RoPE) with a q norm only and with none, GQA ratios 1,
# 2 and 4.
KERNEL_CASES = [(2, 37, 37, 4, 2, 64, "qk", "half", None), (1, 45, 45, 2, 2, 32, "qk", "pairs", 4),
                (1, 33, 33, 2, 1, 72, "qk", "half", 4), (2, 20, 20, 2, 1, 16, "", "pairs", 30),
                (1, 29, 13, 4, 2, 64, "q", None, None), (1, 17, 50, 4, 1, 32, "", None, None)]
# The native kernel only (the interpreter would take minutes): ACE-Step's sliding layer at 30 s (T = 375, window
# 128, Dh = 128, fewer heads), its full layer and its cross-attention (no RoPE, k normed beforehand: q norm
# only); odd T and S; a single query; more keys than one 512-key block with and without a band (window 250: a
# row's second block may hold none of its keys; window 300: both do); GQA ratios 1, 2 and 4; both RoPE forms;
# head dims 16, 72, 128.
NATIVE_CASES = [(1, 375, 375, 4, 2, 128, "qk", "half", 128), (2, 375, 375, 4, 2, 128, "qk", "half", None),
                (2, 97, 41, 4, 2, 128, "q", None, None), (2, 97, 97, 2, 2, 72, "qk", "pairs", 4),
                (1, 33, 33, 4, 1, 16, "k", "half", 0), (1, 1, 1, 2, 1, 64, "qk", "half", None),
                (1, 1, 300, 2, 1, 64, "", None, None), (1, 1100, 1100, 2, 1, 16, "qk", "half", 250),
                (1, 1100, 1100, 2, 1, 16, "qk", "pairs", 300), (1, 600, 600, 2, 1, 16, "", "half", None),
                (1, 70, 70, 4, 2, 64, "qk", None, 1000)]


@pytest.mark.parametrize("backend, B, T, S, HQ, HKV, Dh, norm, rope, window, dtype", backend_cases({
    "native": [(*case, dtype) for case in KERNEL_CASES + NATIVE_CASES for dtype in NATIVE_DTYPES],
    "triton": [(*case, dtype) for case in KERNEL_CASES for dtype in INTERPRETER_DTYPES]}))
def test_matches_reference(backend, B, T, S, HQ, HKV, Dh, norm, rope, window, dtype, request):
    """The Triton kernel launched once per call (counted); the native kernel as the op itself."""
    launches = count_launches(backend, request)
    q, k, v = make_inputs(B, T, S, HQ, HKV, Dh, dtype, seed=T + S + Dh)
    if T > 512:  # the largest logits far along: the running max changes between key blocks
        k = k.clone()
        k[:, T // 2:] *= 3.0
    kw = options(q, norm, rope, window)
    out = runner(backend)(q, k, v, **kw)
    if launches is not None:
        assert launches["_gqa_attention_fwd_kernel"] == 1
    check(out, q, k, v, f"{backend} T={T} S={S} Hq={HQ} Hkv={HKV} Dh={Dh} norm={norm} rope={rope} window={window}",
          **kw)


# -- windows on their edges ---------------------------------------------------------------------------------------
# `window` is None or an int >= 0: query i sees the keys |i - j| <= window (0: its own key only). Two bounds hang
# on it in each kernel: the keys a query tile visits (Triton: from the block holding first row - window up to
# last row + window, inclusive, in BLOCK_N blocks; C++: [r0 - W, r1 + W)), and the shortcut that drops the band
# where it hides no key (window >= T - 1, since |i - j| <= T - 1 always). One short at the first loses the band's
# last key only where that key opens a key block of its own, i.e. window % BLOCK_N == 1 (BLOCK_M a multiple of
# BLOCK_N); one short at the second takes window = T - 2 (which hides the pair (0, T - 1) and no other) for no
# window. Each case is checked window by window and every failing window reported.
FORCED_TILES = dict(BLOCK_M=16, BLOCK_N=16)
KERNELS = ("native", "triton")


def window_failures(backend, q, k, v, windows, config=None, **kw) -> list[str]:
    """The tolerance rule's message for each window in `windows` whose output is off the reference."""
    failures = []
    for window in windows:
        out = gqa_attention(q, k, v, backend=backend, config=config, window=window, **kw)
        try:
            check(out, q, k, v, f"{backend} window={window}", window=window, **kw)
        except AssertionError as e:
            failures.append(str(e))
    return failures


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention", KERNELS))
def test_every_window_up_to_two_key_blocks(backend, request):
    """Every window from 0 to 2 * BLOCK_N on 16 x 16 tiles forced on the Triton kernel, the native kernel over
    the same windows: the band's edge at every offset in a key block, 1 and 17 among them (window % 16 == 1,
    the band's last key alone in its block). T = 40: every window hides keys (the windowed path runs)."""
    launches = count_launches(backend, request)
    T = 40
    windows = range(0, 2 * FORCED_TILES["BLOCK_N"] + 1)
    assert all(not visible(T, window).all() for window in windows)
    q, k, v = make_inputs(1, T, T, 1, 1, 16, torch.float32, seed=40)
    failures = window_failures(backend, q, k, v, windows, config=FORCED_TILES if backend == "triton" else None)
    assert not failures, f"{len(failures)} of {len(windows)} windows off the reference:\n" + "\n".join(failures)
    if launches is not None:
        assert launches["_gqa_attention_fwd_kernel"] == len(windows)


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention", KERNELS))
def test_windows_on_the_sequence_edge(backend, request):
    """T = 67, the Triton kernel on its pinned interpreter tiles (32 x 32), q and k norms and RoPE on: window
    T - 2 = 65 (the widest band that hides a key: rows 0 and T - 1 lose each other), T - 1, T and T + 1 (hide
    none: every key), and the windows below T - 1 that are 1 modulo every BLOCK_N used here and in the
    forced-tile test (32, 16): 1, 33 and 65."""
    launches = count_launches(backend, request)
    T = 67
    block_ns = {PINNED_INTERPRETER["BLOCK_N"], FORCED_TILES["BLOCK_N"]}
    ones = [w for w in range(T - 1) if all(w % n == 1 for n in block_ns)]
    assert block_ns == {32, 16} and ones == [1, 33, 65], (block_ns, ones)
    windows = sorted({*ones, T - 2, T - 1, T, T + 1})
    q, k, v = make_inputs(1, T, T, 1, 1, 16, torch.float32, seed=67)
    kw = options(q, "qk", "half")
    del kw["window"]
    # The band at T - 2 does cut: rows 0 and T - 1 move far beyond any tolerance, the others not at all.
    banded, full = (gqa_attention_ref(q.double(), k.double(), v.double(), window=w, **kw) for w in (T - 2, None))
    moved = (banded - full).abs().amax(dim=(0, 2, 3))
    assert moved[[0, T - 1]].min() > 1e-3 and moved[1:T - 1].max() < 1e-12, moved
    failures = window_failures(backend, q, k, v, windows, **kw)
    assert not failures, f"{len(failures)} of {len(windows)} windows off the reference:\n" + "\n".join(failures)
    if launches is not None:
        assert launches["_gqa_attention_fwd_kernel"] == len(windows)


# -- the Triton kernel's key blocks (on CPU: the interpreter) -------------------------------------------------------
def band_blocks(T, window, block_m, block_n):
    """Key blocks of block_n that some query of each block_m tile sees (|i - j| <= window), summed over tiles."""
    seen = visible(T, window)
    return sum(len(set((seen[r0:r0 + block_m].any(0).nonzero()[:, 0] // block_n).tolist()))
               for r0 in range(0, T, block_m))


@triton_cpu
def test_triton_visits_only_the_key_blocks_in_the_band(monkeypatch):
    """The key loop runs over the blocks that meet the tile's band only, counted as the interpreter's loads of
    (BLOCK_N, Dh) k and v tiles (BLOCK_M = 32 makes q tiles another shape): T = 80, window 4, 16-key blocks:
    9 blocks for the 3 query tiles instead of 15."""
    from triton.runtime.interpreter import InterpreterBuilder

    kv_tiles = []
    load = InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, *args, **kwargs):
        kv_tiles.append(tuple(ptrs.data.shape) == (16, 32))
        return load(self, ptrs, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    q, k, v = make_inputs(1, 80, 80, 1, 1, 32, torch.float32, seed=2)
    out = gqa_attention(q, k, v, window=4, backend="triton", config=dict(BLOCK_M=32, BLOCK_N=16))
    assert band_blocks(80, 4, 32, 16) == 9
    assert sum(kv_tiles) == 2 * 9, sum(kv_tiles)
    check(out, q, k, v, "BLOCK_M=32 BLOCK_N=16 window=4", window=4)


@triton_cpu
def test_triton_forced_config_with_the_band_on_block_edges():
    """16 x 16 tiles, window 15: a band edge on every block boundary; every q head against its kv head."""
    q, k, v = make_inputs(1, 50, 50, 4, 2, 32, torch.float32, seed=3)
    kw = options(q, "qk", "half", 15)
    out = gqa_attention(q, k, v, backend="triton", config=dict(BLOCK_M=16, BLOCK_N=16), **kw)
    check(out, q, k, v, "BLOCK_M=16 BLOCK_N=16 window=15", **kw)


# -- NaN isolation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, dtype", backend_cases({"native": [(dtype,) for dtype in NATIVE_DTYPES],
                                                          "triton": [(torch.float32,)]}))
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_keeps_nan_in_the_rows_that_see_it(backend, dtype):
    nan_isolation(runner(backend), dtype)


def nan_isolation(run, dtype, split=None):
    """A NaN in one q element spoils that output row only (the norm spreads it over the row, no further); a NaN
    in one k element spoils, in the q heads of its kv head, the queries whose band holds that key; every other
    output is bit for bit the clean one. `split`: per-stream norm weights split there (20: the NaN key is the
    second stream's first row, the NaN query in the first stream)."""
    B, T, HQ, HKV, Dh, window = 2, 40, 4, 2, 32, 4
    q, k, v = make_inputs(B, T, T, HQ, HKV, Dh, dtype, seed=5)
    kw = options(q, "qk", "half", window) if split is None else joint_options(q, split, "half", window=window)
    clean = run(q, k, v, **kw)
    q, k = q.clone(), k.clone()
    q[0, 7, 1, 3] = float("nan")  # batch 0, query 7, q head 1
    k[1, 20, 0, 5] = float("nan")  # batch 1, key 20, kv head 0: q heads 0 and 1
    out = run(q, k, v, **kw)
    bad = torch.zeros(B, T, HQ, dtype=torch.bool)
    bad[0, 7, 1] = True
    bad[1, (torch.arange(T) - 20).abs() <= window, :HQ // HKV] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.equal(out[~bad], clean[~bad])


# -- the native CPU kernel only (csrc/gqa_attention.cpp) ------------------------------------------------------------
@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_is_the_default_on_cpu(dtype, monkeypatch):
    """With the extension built, `gqa_attention` on CPU tensors is the C++ kernel and nothing else: no attention,
    norm or RoPE op of ATen shows in the profile, and the reference never runs."""
    assert choose("gqa_attention", torch.device("cpu")) == "native"
    q, k, v = make_inputs(2, 40, 40, 4, 2, 64, dtype, seed=6)
    kw = options(q, "qk", "half", 8)
    expected = native_op(q, k, v, **kw)

    def fail(*args, **kwargs):
        raise AssertionError("the Python implementation ran")

    monkeypatch.setattr(gqa, "gqa_attention_ref", fail)
    with torch.profiler.profile() as prof:
        out = gqa_attention(q, k, v, **kw)
    names = {e.name for e in prof.events()}
    assert "ditengine::gqa_attention" in names, names
    assert not [n for n in names if any(w in n for w in ("attention", "softmax", "rsqrt", "mul", "cat", "bmm"))
                and not n.startswith("ditengine::")], names
    assert torch.equal(out, expected)
    assert torch.equal(gqa_attention(q, k, v, backend="native", **kw), expected)


@native
def test_native_nan_value_stays_in_the_tiles_that_load_it():
    """A NaN in a value row reaches the queries that see its key and, as 0 * NaN, possibly the other rows of a
    64-row tile whose key range holds it; the tiles whose range does not are unchanged (T = 200, window 4:
    key 10 is in the range of tile 0 only)."""
    q, k, v = make_inputs(1, 200, 200, 2, 1, 32, torch.float32, seed=7)
    kw = options(q, "qk", "half", 4)
    clean = native_op(q, k, v, **kw)
    v = v.clone()
    v[0, 10, 0, 2] = float("nan")
    out = native_op(q, k, v, **kw)
    assert torch.isnan(out[0, 6:15]).any(-1).all()
    assert torch.equal(out[0, 64:], clean[0, 64:])


@native
def test_native_scale_eps_float_weights_and_overlapping_rows():
    """A custom scale and eps, fp32 norm weights with bf16 activations (read as fp32 either way), strided RoPE
    tables, and q, k, v expanded over tokens (stride 0: materialised for BLAS)."""
    q, k, v = make_inputs(2, 30, 30, 4, 2, 32, torch.float32, seed=8)
    w_q, w_k = norm_weights(32, torch.float32)
    cos, sin = rope_tables(30, 32)
    wide = torch.zeros(30, 2, 40)
    wide[:, 0, :32], wide[:, 1, :32] = cos, sin
    kw = dict(q_norm=w_q, k_norm=w_k, eps=1e-3, rope=(wide[:, 0, :32], wide[:, 1, :32]), window=5, scale=0.3)
    check(native_op(q, k, v, **kw), q, k, v, "scale, eps, strided tables", **kw)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = native_op(qb, kb, vb, **kw)
    kw_b = {**kw, "q_norm": w_q.bfloat16().float(), "k_norm": w_k.bfloat16().float()}
    assert not torch.equal(out, native_op(qb, kb, vb, **kw_b))  # the fp32 weights are not rounded to bf16
    check(out, qb, kb, vb, "bf16 activations, fp32 weights", **kw)
    q1, k1, v1 = q[:, :1].expand(2, 30, 4, 32), k[:, :1].expand(2, 30, 2, 32), v[:, :1].expand(2, 30, 2, 32)
    kw1 = dict(q_norm=w_q, window=3)
    check(native_op(q1, k1, v1, **kw1), q1, k1, v1, "expanded rows", **kw1)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_same_inputs_same_bits(dtype):
    q, k, v = make_inputs(2, 375, 375, 4, 2, 128, dtype, seed=9)
    kw = options(q, "qk", "half", 128)
    first = native_op(q, k, v, **kw)
    assert all(torch.equal(first, native_op(q, k, v, **kw)) for _ in range(3))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_passes_opcheck(dtype):
    q, k, v = make_inputs(2, 9, 9, 4, 2, 16, dtype)
    kw = options(q, "qk", "pairs", 3)
    cos, sin = kw["rope"]
    torch.library.opcheck(torch.ops.ditengine.gqa_attention,
                          (q, k, v, kw["q_norm"], kw["k_norm"], 1e-6, cos, sin, True, 3, 0.25))
    qc, kc, vc = make_inputs(1, 5, 7, 2, 1, 16, dtype)
    torch.library.opcheck(torch.ops.ditengine.gqa_attention,
                          (qc, kc, vc, None, None, 1e-6, None, None, False, None, 0.3))


@pytest.fixture(scope="module")
def isa_variant(tmp_path_factory):
    """isa -> the native outputs with DITENGINE_ISA=isa (the softmax's exp and max differ by ISA)."""
    code = """
        import torch
        from ditengine.kernels import gqa_attention, _native
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(2, 150, 8 * 64, generator=g)
        q, k, v = (t.unflatten(-1, (-1, 64)) for t in proj.split([4 * 64, 2 * 64, 2 * 64], dim=-1))
        w = 1 + 0.3 * torch.randn(64, generator=g)
        # Built in float64: each ISA runs in its own process, and torch's float32 cos of large angles differs
        # from process to process on some CPUs (up to 1.5e-4 on a Xeon with AMX), which would fail the comparison.
        ang = torch.outer(torch.arange(150.0).double(), 1e4 ** -(torch.arange(0, 64, 2).double() / 64))
        rope = (torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float())
        outs = [_native.build_info()["isa"]]
        for dt in (torch.float32, torch.bfloat16):
            outs += [gqa_attention(q.to(dt), k.to(dt), v.to(dt), q_norm=w, k_norm=w, rope=rope, window=w_,
                                   backend="native") for w_ in (None, 20)]
        torch.save(outs, "{path}")
    """
    return isa_runner(tmp_path_factory, code)


@native
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_native_isa_variants_agree(isa, isa_variant):
    """Each vector variant of the softmax's row operations against the scalar baseline."""
    skip_unless_cpu_runs(isa)
    for a, b in zip(isa_variant(isa), isa_variant("baseline")):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5 if a.dtype == torch.float32 else 2e-2,
                                   rtol=1e-5 if a.dtype == torch.float32 else 2e-2)


# -- bad inputs: one table against every backend and the op's C++ checks --------------------------------------------
class Op(NamedTuple):
    """What the registered op called directly (on CPU: the C++ kernel's checks) does with a row's input: raises
    `exc` matching `match`, or takes the input (exc None); `why` says why it differs from the Python check,
    where it does (another exception type, or no error)."""
    exc: type | None
    match: str = ""
    why: str = ""


class Bad(NamedTuple):
    """One bad input: `over(valid)` gives the keyword arguments that replace some of a valid call's (see
    `valid_call`); `gqa_attention` raises `exc` with a message matching `match` (a regex, or a function of the
    backend giving one) that names the argument, on each of `backends` ("auto": backend=None); `op`: the same
    input given to the registered op directly, None where it has no such form (rope not a pair, config, backend)."""
    id: str
    over: Callable[[dict], dict]
    exc: type
    match: str | Callable[[str | None], str]
    op: Op | None
    backends: tuple = ("auto", "native", "triton", "reference")


def valid_call() -> dict:
    """A valid self-attention call with every option on: q (2, 6, 4, 16) over 2 kv heads, q and k norms,
    rotate-half RoPE, window 2 (fresh seeded inputs)."""
    q, k, v = make_inputs(2, 6, 6, 4, 2, 16, torch.float32, seed=31)
    return dict(q=q, k=k, v=v, **options(q, "qk", "half", 2))


def short_kv(a, **more):
    """k and v with 5 keys for the 6 queries (cross-attention), RoPE and the window off unless `more` says."""
    return {"k": a["k"][:, :5], "v": a["v"][:, :5], "rope": None, "window": None, **more}


def seeded(*shape, seed=32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def joint(**over):
    """Over a valid call: the (2, Dh) per-stream weights of `stream_weights`, and `over`."""
    def make(a):
        w_q, w_k = stream_weights(16, torch.float32)
        return {key: value(w_q, w_k) if callable(value) else value for key, value in over.items()}
    return make


FLOAT_FOR_INT = ("the op's schema refuses a float for an int argument, naming it, with a RuntimeError before the "
                 "op's checks (C++ or Python body) run")
BOOL_AS_NUMBER = "the op's schema takes a bool as the number 1, which the op's checks (C++ and Python body) accept"
SCHEMA_ACTS_FIRST = (FLOAT_FOR_INT, BOOL_AS_NUMBER)  # before the C++ kernel or the Python body: PyTorch's own
NORM_SPLIT_RANGE = r"norm_split: expected an int with 0 < norm_split < T = 6 \(both streams non-empty\)"

BAD_INPUTS = [
    Bad("q-3d", lambda a: dict(q=a["q"].flatten(2)), ValueError,
        r"q: expected 4 dimensions \(B, T, Hq, Dh\), got shape \(2, 6, 64\)",
        Op(ValueError, r"q must be \(B, T, Hq, Dh\), got 3 dimensions")),
    Bad("k-batch", lambda a: dict(k=a["k"][:1], v=a["v"][:1]), ValueError,
        r"k: batch and head dim must match q \(2, 6, 4, 16\), got \(1, 6, 2, 16\)",
        Op(ValueError, r"k must be \(B, S, Hkv, Dh\) with q's batch and head dim")),
    Bad("v-shape", lambda a: dict(v=a["v"][:, :5]), ValueError,
        r"v: expected shape \(2, 6, 2, 16\) \(B, S, Hkv, Dh\) like k, got \(2, 5, 2, 16\)",
        Op(ValueError, "v must have k's shape")),
    Bad("k-heads", lambda a: dict(k=seeded(2, 6, 3, 16), v=seeded(2, 6, 3, 16, seed=33)), ValueError,
        "k: q's 4 heads must be a multiple of k's 3 heads",
        Op(ValueError, "q's 4 heads must be a multiple of k's 3 heads")),
    Bad("k-no-heads", lambda a: dict(k=a["k"][:, :, :0], v=a["v"][:, :, :0]), ValueError,
        "k: q's 4 heads must be a multiple of k's 0 heads",
        Op(ValueError, "q's 4 heads must be a multiple of k's 0 heads")),
    Bad("k-fp16", lambda a: dict(k=a["k"].half()), TypeError, r"k: expected dtype in \['float32'\], got float16",
        Op(TypeError, "k has dtype Half but q has Float")),
    Bad("k-bf16", lambda a: dict(k=a["k"].bfloat16()), TypeError, r"k: expected dtype in \['float32'\], got bfloat16",
        Op(TypeError, "k has dtype BFloat16 but q has Float")),
    Bad("q-fp64", lambda a: dict(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError,
        r"q: expected dtype in \['float32', 'float16', 'bfloat16'\], got float64",
        Op(TypeError, "q must be float32, bfloat16 or float16, got Double")),
    # A meta tensor among CPU ones: the dispatcher sends the op to its fake implementation (PyTorch's dispatch, not
    # the C++ kernel), which checks with gqa_attention's own checks.
    Bad("v-meta", lambda a: dict(v=a["v"].to("meta")), ValueError, "v: on meta, expected cpu like the other inputs",
        Op(ValueError, "v: on meta, expected cpu like the other inputs")),
    Bad("q-last-dim-strided", lambda a: dict(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
        "q: the last dimension must be contiguous", Op(ValueError, r"q: the last dimension \(Dh\) must be contiguous")),
    Bad("v-last-dim-strided", lambda a: dict(v=a["v"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
        "v: the last dimension must be contiguous", Op(ValueError, r"v: the last dimension \(Dh\) must be contiguous")),
    Bad("head-dim-12", lambda a: dict(zip("qkv", make_inputs(1, 4, 4, 2, 1, 12, torch.float32, seed=34)), q_norm=None,
                                      k_norm=None, rope=None),
        ValueError, r"head dim 12 is not supported: expected a multiple of 8 from 16 to 256 \(gqa_attention_ref takes "
                    r"any\)",
        Op(ValueError, "q: head dim 12 is not supported: expected a multiple of 8 from 16 to 256")),
    Bad("q-no-tokens", lambda a: dict(q=a["q"][:, :0], rope=None, window=None), ValueError,
        "sequence lengths must be at least 1, got q 0, k 6",
        Op(ValueError, "sequence lengths must be at least 1, got q 0, k 6")),
    Bad("k-no-tokens", lambda a: dict(k=a["k"][:, :0], v=a["v"][:, :0], rope=None, window=None), ValueError,
        "sequence lengths must be at least 1, got q 6, k 0", Op(ValueError, "k and v need at least one token")),
    Bad("q_norm-shape", lambda a: dict(q_norm=a["q_norm"][:8]), ValueError,
        r"q_norm: expected shape \(16\) \(Dh,\): the RMSNorm weight, got \(8,\)",
        Op(ValueError, r"q_norm must be the \(Dh,\) = \(16,\) RMSNorm weight, got shape \[8\]")),
    Bad("k_norm-int", lambda a: dict(k_norm=a["k_norm"].long()), TypeError, r"k_norm: expected dtype in .*, got int64",
        Op(TypeError, "k_norm must be a floating-point tensor, got Long")),
    Bad("eps-negative", lambda a: dict(eps=-1.0), ValueError, "eps: expected a finite number >= 0, got -1.0",
        Op(ValueError, "eps must be finite and >= 0, got -1")),
    Bad("eps-nan", lambda a: dict(eps=float("nan")), ValueError, "eps: expected a finite number >= 0, got nan",
        Op(ValueError, "eps must be finite and >= 0, got nan")),
    Bad("eps-bool", lambda a: dict(eps=True), ValueError, "eps: expected a finite number >= 0, got True",
        Op(None, why=BOOL_AS_NUMBER)),
    Bad("rope-not-a-pair", lambda a: dict(rope=a["rope"][0]), TypeError,
        r"rope: expected a \(cos, sin\) pair of \(T, Dh\) float32 tensors, got Tensor", None),
    Bad("rope-cos-columns", lambda a: dict(rope=(a["rope"][0][:, :8], a["rope"][1])), ValueError,
        r"rope cos: expected shape \(6, 16\) \(T, Dh\): one row per query position, got \(6, 8\)",
        Op(ValueError, r"rope cos must be \(T, Dh\) = \(6, 16\), got shape \[6, 8\]")),
    Bad("rope-cos-rows", lambda a: dict(rope=(a["rope"][0][:5], a["rope"][1])), ValueError,
        r"rope cos: expected shape \(6, 16\) \(T, Dh\): one row per query position, got \(5, 16\)",
        Op(ValueError, r"rope cos must be \(T, Dh\) = \(6, 16\), got shape \[5, 16\]")),
    Bad("rope-cos-strided", lambda a: dict(rope=(a["rope"][0].t().contiguous().t(), a["rope"][1])), ValueError,
        "rope cos: the last dimension must be contiguous",
        Op(ValueError, "rope cos: the last dimension must be contiguous")),
    Bad("rope-sin-bf16", lambda a: dict(rope=(a["rope"][0], a["rope"][1].bfloat16())), TypeError,
        r"rope sin: expected dtype in \['float32'\], got bfloat16",
        Op(TypeError, "rope sin must be float32, got BFloat16")),
    Bad("rope-sin-fp16", lambda a: dict(rope=(a["rope"][0], a["rope"][1].half())), TypeError,
        r"rope sin: expected dtype in \['float32'\], got float16", Op(TypeError, "rope sin must be float32, got Half")),
    Bad("rope-sin-none", lambda a: dict(rope=(a["rope"][0], None)), TypeError,
        "rope sin: expected a torch.Tensor, got NoneType",
        Op(TypeError, r"rope sin: expected a tensor, got None \(rope needs both cos and sin, or neither\)")),
    Bad("rope-cross-attention", lambda a: short_kv(a, rope=a["rope"]), ValueError,
        "rope: RoPE is for self-attention and needs k's length S = q's length T, got S=5, T=6",
        Op(ValueError, "rope: RoPE needs k's length S = q's length T, got S=5, T=6")),
    Bad("window-cross-attention", lambda a: short_kv(a, window=2), ValueError,
        "window: a sliding window is for self-attention and needs S = T, got S=5",
        Op(ValueError, "window: a sliding window needs S = T, got S=5, T=6")),
    Bad("window-negative", lambda a: dict(window=-1), ValueError,
        r"window: expected None or an int >= 0 \(keys with \|i - j\| <= window\)",
        Op(ValueError, "window must be >= 0, got -1")),
    Bad("window-float", lambda a: dict(window=2.0), ValueError,
        r"window: expected None or an int >= 0 \(keys with \|i - j\| <= window\)",
        Op(RuntimeError, r"Expected a value of type 'Optional\[int\]' for argument 'window'", why=FLOAT_FOR_INT)),
    Bad("window-bool", lambda a: dict(window=True), ValueError,
        r"window: expected None or an int >= 0 \(keys with \|i - j\| <= window\)", Op(None, why=BOOL_AS_NUMBER)),
    Bad("scale-zero", lambda a: dict(scale=0.0), ValueError, "scale: expected a finite softmax scale > 0",
        Op(ValueError, "scale must be a finite softmax scale > 0, got 0")),
    Bad("scale-negative", lambda a: dict(scale=-0.1), ValueError, "scale: expected a finite softmax scale > 0",
        Op(ValueError, "scale must be a finite softmax scale > 0, got -0.1")),
    Bad("scale-inf", lambda a: dict(scale=float("inf")), ValueError, "scale: expected a finite softmax scale > 0",
        Op(ValueError, "scale must be a finite softmax scale > 0, got inf")),
    Bad("scale-bool", lambda a: dict(scale=True), ValueError, "scale: expected a finite softmax scale > 0",
        Op(None, why=BOOL_AS_NUMBER)),
    # joint attention: (2, Dh) per-stream weights and norm_split
    Bad("q_norm-split-missing", joint(q_norm=lambda w_q, w_k: w_q), ValueError,
        r"norm_split: \(2, Dh\) q_norm weights need norm_split",
        Op(ValueError, "per-stream norm weights need norm_split")),
    Bad("k_norm-split-missing", joint(k_norm=lambda w_q, w_k: w_k), ValueError,
        r"norm_split: \(2, Dh\) k_norm weights need norm_split",
        Op(ValueError, "per-stream norm weights need norm_split")),
    Bad("norm_split-one-stream", lambda a: dict(norm_split=3), ValueError,
        r"norm_split: only for \(2, Dh\) per-stream q_norm / k_norm weights",
        Op(ValueError, r"norm_split is only for \(2, Dh\) per-stream")),
    Bad("norm_split-no-norm", lambda a: dict(q_norm=None, k_norm=None, norm_split=3), ValueError,
        r"norm_split: only for \(2, Dh\)", Op(ValueError, r"norm_split is only for \(2, Dh\) per-stream")),
    *[Bad(f"norm_split-{bad}", joint(q_norm=lambda w_q, w_k: w_q, norm_split=bad), ValueError, NORM_SPLIT_RANGE,
          Op(ValueError, f"norm_split must satisfy 0 < norm_split < T = 6, got {bad}")) for bad in (0, 6, -1, -2)],
    Bad("norm_split-bool", joint(q_norm=lambda w_q, w_k: w_q, norm_split=True), ValueError, NORM_SPLIT_RANGE,
        Op(None, why=BOOL_AS_NUMBER)),
    Bad("norm_split-float", joint(q_norm=lambda w_q, w_k: w_q, norm_split=2.5), ValueError, NORM_SPLIT_RANGE,
        Op(RuntimeError, r"Expected a value of type 'Optional\[int\]' for argument 'norm_split'", why=FLOAT_FOR_INT)),
    Bad("q_norm-three-rows", joint(q_norm=lambda w_q, w_k: torch.ones(3, 16), norm_split=3), ValueError,
        r"q_norm: expected shape \(16\) \(Dh,\): the RMSNorm weight, got \(3, 16\) \(per-stream weights: \(2, 16\) "
        r"\(2, Dh\)\)",
        Op(ValueError, r"q_norm must be the \(Dh,\) = \(16,\) RMSNorm weight, got shape \[3, 16\] \(per-stream "
                       r"weights: \(2, Dh\) = \(2, 16\)\)")),
    Bad("k_norm-split-columns", joint(k_norm=lambda w_q, w_k: w_k[:, :8], norm_split=3), ValueError,
        r"k_norm: expected shape \(16\) .*, got \(2, 8\)",
        Op(ValueError, r"k_norm must be the \(Dh,\) = \(16,\) RMSNorm weight, got shape \[2, 8\]")),
    Bad("k_norm-split-cross-attention",
        lambda a: {**short_kv(a), **joint(k_norm=lambda w_q, w_k: w_k, norm_split=3)(a)},
        ValueError, r"k_norm: \(2, Dh\) weights split k's rows at norm_split as q's and need S = T, got S=5, T=6",
        Op(ValueError, "k_norm: .2, Dh. weights split k's rows as q's and need S = T, got S=5")),
    # the dispatch arguments, which only the public function has
    Bad("backend-unknown", lambda a: dict(backend="cuda"), ValueError, "backend: expected one of", None, ("auto",)),
    Bad("config-off-triton", lambda a: dict(config=AUTOTUNE_CONFIGS[0]), ValueError,
        lambda backend: "config: only the Triton kernel takes a launch config; pass backend='triton', got backend="
                        + re.escape(repr(backend)),
        None, ("auto", "native", "reference")),
    Bad("config-block", lambda a: dict(config=dict(BLOCK_M=32, BLOCK_N=48)), ValueError,
        "config: BLOCK_N must be a power of two >= 16, got 48", None, ("triton",)),
]


def bad_input_params() -> list:
    """(row, backend) for each row on each of its backends, and on "op" (the registered op called directly) and
    "op-python-body" (its Python body) where the row has an op form; each with the skip mark of the backend it
    needs (the op's C++ checks: the native kernel's)."""
    marks = {p.values[0]: p.marks for p in cpu_backends("gqa_attention")}
    marks.update(auto=(), op=marks["native"], **{"op-python-body": ()})
    ops = ("op", "op-python-body")
    return [pytest.param(bad, backend, marks=marks[backend], id=f"{bad.id}-{backend}")
            for bad in BAD_INPUTS for backend in (*bad.backends, *(ops if bad.op is not None else ()))]


def op_expectation(bad, backend: str, call: dict) -> "Op":
    """What the op called directly does with a bad input: its table entry, or, through the Python body (which
    `call` is switched to), the public function's error where the op's schema does not refuse it first."""
    if backend == "op-python-body":
        call["python_body"] = True
        if bad.op.why not in SCHEMA_ACTS_FIRST:
            return Op(bad.exc, bad.match)
    return bad.op


@pytest.mark.parametrize("bad, backend", bad_input_params())
def test_bad_input_raises_naming_the_argument(bad, backend):
    """`gqa_attention` checks its arguments in Python first, whatever the backend (on CUDA too, where the C++
    checks never run). "op": the registered op called directly reaches the C++ kernel's own checks on CPU;
    they raise the Python check's exception type and name the argument, or the row says what they do
    instead, and the case is reported as an expected failure with that reason. "op-python-body": the op's
    Python body checks with gqa_attention's own `_check_args`, so it raises gqa_attention's error, except where
    the op's schema acts first (a bool or a float for a number: the row's op form says what happens)."""
    call = {**valid_call(), "backend": None if backend == "auto" else backend}
    call.update(bad.over(call))
    if not backend.startswith("op"):
        match = bad.match(call["backend"]) if callable(bad.match) else bad.match
        with pytest.raises(bad.exc, match=match):
            gqa_attention(**call)
        return
    del call["backend"]
    expect = op_expectation(bad, backend, call)
    if expect.exc is None:
        out = native_op(**call)
        assert out.shape == call["q"].shape
        pytest.xfail(f"the op takes what gqa_attention refuses with a {bad.exc.__name__}: {bad.op.why}")
    with pytest.raises(expect.exc, match=expect.match):
        native_op(**call)
    if expect.exc is not bad.exc:
        pytest.xfail(f"the op raises a {bad.op.exc.__name__} where gqa_attention raises a {bad.exc.__name__}: "
                     f"{bad.op.why}")


@pytest.mark.parametrize("backend", [*cpu_backends("gqa_attention"), pytest.param("op", marks=native)])
def test_bad_input_table_starts_from_valid_calls(backend):
    """The table's valid call, its joint form ((2, Dh) q and k norm weights split at 3) and a q split alone against
    5 keys (only k's rows need S = T) run on every backend and on the op, within the tolerance rule."""
    a = valid_call()
    w_q, w_k = stream_weights(16, torch.float32)
    run = native_op if backend == "op" else functools.partial(gqa_attention, backend=backend)
    for name, over in (("valid", {}), ("joint", dict(q_norm=w_q, k_norm=w_k, norm_split=3)),
                       ("q split, 5 keys", dict(**short_kv(a), q_norm=w_q, norm_split=3))):
        kw = {**a, **over}
        q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
        check(run(q, k, v, **kw), q, k, v, f"{backend} {name}", **kw)


# -- the reference, the op and its fake implementation ---------------------------------------------------
def test_reference_backend_and_fake_implementation():
    q, k, v = make_inputs(2, 7, 7, 4, 2, 16, torch.float32)
    kw = options(q, "qk", "half", 2)
    assert torch.equal(gqa_attention(q, k, v, backend="reference", **kw), gqa_attention_ref(q, k, v, **kw))
    from torch._subclasses.fake_tensor import FakeTensorMode

    cos, sin = kw["rope"]
    tensors = (q, k, v, kw["q_norm"], kw["k_norm"])
    with FakeTensorMode() as mode:
        fq, fk, fv, fwq, fwk = (mode.from_tensor(t) for t in tensors)
        fake = torch.ops.ditengine.gqa_attention(fq, fk, fv, fwq, fwk, 1e-6, mode.from_tensor(cos),
                                                 mode.from_tensor(sin), False, 2, 0.25)
    assert fake.shape == q.shape and fake.dtype == q.dtype and fake.is_contiguous()
    meta = torch.ops.ditengine.gqa_attention(*(t.to("meta") for t in tensors), 1e-6, cos.to("meta"), sin.to("meta"),
                                             False, 2, 0.25)
    assert meta.shape == q.shape and meta.device.type == "meta"


def test_reference_pieces_are_diffusers_own():
    """The reference's RMSNorm and both RoPE forms against diffusers' `RMSNorm` and `apply_rotary_emb`, bit for
    bit in fp32 and bf16 (the model's dtypes)."""
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
    from diffusers.models.normalization import RMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        q, _, _ = make_inputs(2, 11, 11, 3, 1, 32, dtype, seed=10)
        norm = RMSNorm(32, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(norm_weights(32, dtype)[0])
            assert torch.equal(gqa.rms_norm_ref(q, norm.weight, 1e-6), norm(q))
        for interleaved in (False, True):
            cos, sin = get_1d_rotary_pos_embed(32, torch.arange(11, dtype=torch.float32), theta=1e6, use_real=True,
                                               repeat_interleave_real=interleaved)
            assert torch.equal(gqa.rope_ref(q, cos, sin, interleaved),
                               apply_rotary_emb(q, (cos, sin), use_real=True, use_real_unbind_dim=-1 if interleaved
                                                else -2, sequence_dim=1))


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention", ("reference", "triton")))
def test_python_body_matches_reference(backend, monkeypatch):
    """The op's Python implementation, reached past the native CPU kernel: the reference (the fallback, and the
    CPU path without the extension or the interpreter), or the Triton kernel where `use_triton` says so (CUDA;
    here the interpreter)."""
    monkeypatch.setattr(gqa, "use_triton", lambda op, *tensors: backend == "triton")
    q, k, v = make_inputs(1, 21, 21, 4, 2, 32, torch.float32, seed=11)
    kw = options(q, "qk", "pairs", 4)
    cos, sin = kw["rope"]
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out = torch.ops.ditengine.gqa_attention.default.redispatch(python_impl, q, k, v, kw["q_norm"], kw["k_norm"], 1e-6,
                                                               cos, sin, True, 4, 32**-0.5)
    check(out, q, k, v, f"python body ({backend})", **kw)


def test_registered_op_passes_opcheck():
    q, k, v = make_inputs(1, 6, 6, 2, 1, 16, torch.float32)
    kw = options(q, "qk", "half", 2)
    cos, sin = kw["rope"]
    torch.library.opcheck(torch.ops.ditengine.gqa_attention,
                          (q, k, v, kw["q_norm"], kw["k_norm"], 1e-6, cos, sin, False, 2, 0.25))


def test_triton_kernel_compiles_for_the_h100_without_a_gpu():
    """ptxas from Triton's wheel (as bench/sm90.py does for the other kernels): the GPU's pinned bf16 and fp32
    launches with every prologue step and the window compile for sm_90, bf16 dots on warpgroup tensor cores,
    nothing spilled, shared memory within the limit; ACE-Step's head dim (128) and a split one (72), the
    joint models' per-stream weights with interleaved RoPE (Flux's 128, SD3.5's 64), and the ring's form with
    the log-sum-exp stored (128)."""
    out = run_python("""
        import importlib, json
        import ditengine.kernels
        from ditengine.bench.sm90 import SHARED_LIMIT, compile_sm90, resources
        from ditengine.kernels.attention import PINNED_GPU, PINNED_GPU_FP32, head_blocks
        fn = importlib.import_module("ditengine.kernels.gqa_attention")._gqa_attention_fwd_kernel
        rows = []
        for dtype, config in (("bf16", PINNED_GPU), ("fp32", PINNED_GPU_FP32)):
            for head_dim, split, lse in ((128, False, False), (72, False, False), (128, True, False),
                                         (64, True, False), (128, False, True)):
                d1, d2 = head_blocks(head_dim)
                pointers = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr", "qw_ptr", "kw_ptr"), dtype),
                            "lse_ptr": "fp32", "cos_ptr": "fp32", "sin_ptr": "fp32"}
                scalars = {**{n: "i64" for n in fn.arg_names if n.startswith("stride")}, "HQ": "i32", "GROUP": "i32",
                           "T_Q": "i32", "T_K": "i32", "window": "i32", "norm_split": "i32", "eps": "fp32",
                           "qk_scale": "fp32"}
                kernel = compile_sm90(fn, pointers, scalars, dict(
                    HEAD_DIM=head_dim, D1=d1, D2=d2, Q_NORM=True, K_NORM=True, Q_SPLIT=split, K_SPLIT=split,
                    ROPE=True, INTERLEAVED=split,
                    WINDOWED=True, PRECISION="ieee" if dtype == "fp32" else "tf32", RETURN_LSE=lse,
                    BLOCK_M=config["BLOCK_M"],
                    BLOCK_N=config["BLOCK_N"]), config["num_warps"], config["num_stages"])
                rows.append(dict(dtype=dtype, head_dim=head_dim, limit=SHARED_LIMIT, **resources(kernel)))
        print(json.dumps(rows))
    """, TRITON_INTERPRET="0")
    rows = json.loads(out.strip().splitlines()[-1])
    for row in rows:
        assert row["local_bytes"] == 0 and row["shared_bytes"] <= row["limit"], row
    assert [row["wgmma"] for row in rows] == [True] * 5 + [False] * 5, rows


# -- joint attention: per-stream (2, Dh) norm weights split at norm_split --------------------------------------------
def stream_weights(Dh, dtype, seed=12, device="cpu"):
    """Per-stream (2, Dh) q and k RMSNorm weights near 1, the two rows clearly apart."""
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.3 * torch.randn(2, 2, Dh, generator=g))
    w[:, 1] += 0.5  # the second stream's weights: a wrong row choice is far outside any tolerance
    return w.to(device=device, dtype=dtype).unbind(0)


def joint_options(q, split, rope=None, norm="qk", window=None):
    """`options` with (2, Dh) weights split at `split`; norm "qk", "q" (k's (Dh,) weight shared by both
    streams) or "k" (q unnormalised)."""
    kw = options(q, "qk", rope, window)
    w_q, w_k = stream_weights(q.shape[-1], q.dtype, device=q.device)
    kw.update(q_norm=w_q if "q" in norm else None, k_norm=w_k if "k" in norm else kw["k_norm"], norm_split=split)
    return kw


def flux_rope(L, h, w, axes_dim, theta=10000):
    """Flux's RoPE tables over [text; image]: `FluxPosEmbed` on the pipeline's ids, zeros for the L text tokens
    and (0, row, col) for the h x w image grid; (L + h*w, sum(axes_dim)) fp32, interleaved pairs."""
    flux = pytest.importorskip("diffusers.models.transformers.transformer_flux")
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    ids = torch.cat([torch.zeros(L, 3), img.reshape(h * w, 3)])
    cos, sin = flux.FluxPosEmbed(theta, list(axes_dim))(ids)
    return cos.float(), sin.float()



@pytest.mark.parametrize("backend", cpu_backends("gqa_attention"))
@pytest.mark.parametrize("model", ["sd3", "flux", "half"])
def test_joint_attention_matches_diffusers_pieces(model, backend):
    """Joint attention composed from diffusers' pieces, as `JointAttnProcessor2_0` (SD3.5: [image; text], no
    RoPE) and `FluxAttnProcessor` ([text; image], interleaved RoPE from `FluxPosEmbed` over every row) run it:
    an `RMSNorm` module per stream and per q / k on its row range, the concatenation, `apply_rotary_emb`, SDPA.
    Every backend here matches it, rel err <= 1e-5 in fp32; the second stream's weights do matter (with the
    first stream's weights everywhere the output is far off)."""
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(3)
    B, HQ, Dh = 2, 2, 32
    first, second = (37, 13) if model != "flux" else (13, 36)  # flux: 13 text tokens, a 6 x 6 image grid
    T = first + second
    q, k, v = make_inputs(B, T, T, HQ, HQ, Dh, torch.float32, seed=21)
    norms = {}
    for name in ("q", "k", "added_q", "added_k"):
        norms[name] = RMSNorm(Dh, eps=1e-6)
        with torch.no_grad():
            norms[name].weight.copy_(1 + 0.3 * torch.randn(Dh))
    # SD3.5: image rows first (norm_q / norm_k), then the text's (norm_added_*); Flux: text first.
    a, b = ("q", "added_q"), ("k", "added_k")
    if model == "flux":
        a, b = a[::-1], b[::-1]
    rope, unbind = None, -1
    if model == "flux":
        rope = flux_rope(first, 6, 6, (8, 12, 12))
    elif model == "half":
        rope, unbind = rope_tables(T, Dh), -2
    with torch.no_grad():
        qn = torch.cat([norms[a[0]](q[:, :first]), norms[a[1]](q[:, first:])], dim=1)
        kn = torch.cat([norms[b[0]](k[:, :first]), norms[b[1]](k[:, first:])], dim=1)
        if rope is not None:
            qn = apply_rotary_emb(qn, rope, use_real=True, use_real_unbind_dim=unbind, sequence_dim=1)
            kn = apply_rotary_emb(kn, rope, use_real=True, use_real_unbind_dim=unbind, sequence_dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        kw = dict(q_norm=torch.stack([norms[a[0]].weight, norms[a[1]].weight]),
                  k_norm=torch.stack([norms[b[0]].weight, norms[b[1]].weight]), eps=1e-6, norm_split=first,
                  rope=rope, rope_interleaved=model == "flux")
        out = gqa_attention(q, k, v, backend=backend, **kw)
        rel = ((out - expected).abs().max() / expected.abs().max()).item()
        assert rel <= 1e-5, f"{backend}: rel err {rel:.2e}"
        one = gqa_attention_ref(q, k, v, **{**kw, "q_norm": kw["q_norm"][0], "k_norm": kw["k_norm"][0],
                                            "norm_split": None})
        assert ((one - expected).abs().max() / expected.abs().max()).item() > 1e-2


# (B, first, second, Hq, Hkv, Dh, norm, rope, window), on every kernel: the interpreter's 32-row tiles: a split
# inside a tile (37 + 13) and on a tile boundary (32 + 13, 64 + 7), both RoPE forms and none, the split head dim
# 72, GQA 2, a q split with k's (Dh,) weight shared, a k split with q unnormalised, a window across the split.
KERNEL_JOINT_CASES = [(1, 37, 13, 2, 2, 64, "qk", "pairs", None), (2, 32, 13, 2, 2, 32, "qk", "half", None),
                      (1, 37, 13, 2, 2, 72, "qk", None, None), (1, 64, 7, 4, 2, 32, "q", "half", None),
                      (1, 20, 25, 2, 1, 16, "k", "pairs", 6)]
# The native kernel only: SD3.5's [image; text] at 1024 + 333 (the split on a 64-row tile and, for keys, on a
# 512-key block boundary), one inside a tile and a key block (1000 + 357), Flux's head dim 128 with interleaved
# RoPE, a window across the split, a q-only split in cross-attention (S != T), GQA 2.
NATIVE_JOINT_CASES = [(1, 1024, 333, 2, 2, 64, "qk", None, None), (1, 1000, 357, 2, 2, 64, "qk", "pairs", None),
                      (2, 77, 120, 2, 2, 128, "qk", "pairs", None), (1, 150, 97, 4, 2, 64, "qk", "half", 40),
                      (1, 37, 13, 2, 1, 16, "k", "half", None)]


@pytest.mark.parametrize("backend, B, first, second, HQ, HKV, Dh, norm, rope, window, dtype", backend_cases({
    "native": [(*case, dtype) for case in KERNEL_JOINT_CASES + NATIVE_JOINT_CASES
               for dtype in (torch.float32, torch.bfloat16)],
    "triton": [(*case, torch.float32) for case in KERNEL_JOINT_CASES]}))
def test_joint_matches_reference(backend, B, first, second, HQ, HKV, Dh, norm, rope, window, dtype, request):
    launches = count_launches(backend, request)
    T = first + second
    q, k, v = make_inputs(B, T, T, HQ, HKV, Dh, dtype, seed=T + Dh)
    kw = joint_options(q, first, rope, norm, window)
    out = runner(backend)(q, k, v, **kw)
    if launches is not None:
        assert launches["_gqa_attention_fwd_kernel"] == 1
    check(out, q, k, v, f"{backend} joint {first}+{second} Dh={Dh} norm={norm} rope={rope} window={window}", **kw)



@triton_cpu
def test_triton_joint_split_on_a_key_block_edge():
    """16 x 16 tiles: the split at 48 is on a query tile's and a key block's edge, at 40 inside both."""
    q, k, v = make_inputs(1, 61, 61, 2, 1, 32, torch.float32, seed=13)
    for split in (48, 40):
        kw = joint_options(q, split, "pairs")
        out = gqa_attention(q, k, v, backend="triton", config=dict(BLOCK_M=16, BLOCK_N=16), **kw)
        check(out, q, k, v, f"triton joint split={split} 16 x 16 tiles", **kw)



@pytest.mark.parametrize("backend, dtype", backend_cases({"native": [(torch.float32,), (torch.bfloat16,)],
                                                          "triton": [(torch.float32,)]}))
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_joint_keeps_nan_in_the_rows_that_see_it(backend, dtype):
    nan_isolation(runner(backend), dtype, split=20)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_joint_q_split_in_cross_attention(dtype):
    """A (2, Dh) q_norm over T query rows against S != T keys with a (Dh,) k_norm: only q's rows split."""
    q, k, v = make_inputs(1, 90, 41, 4, 2, 64, dtype, seed=14)
    kw = joint_options(q, 70, None, "q")
    check(native_op(q, k, v, **kw), q, k, v, "native joint q split, cross-attention", **kw)



@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_joint_passes_opcheck(dtype):
    q, k, v = make_inputs(1, 9, 9, 2, 2, 16, dtype)
    kw = joint_options(q, 4, "pairs", window=3)
    cos, sin = kw["rope"]
    torch.library.opcheck(torch.ops.ditengine.gqa_attention,
                          (q, k, v, kw["q_norm"], kw["k_norm"], 1e-6, cos, sin, True, 3, 0.25, 4))



def test_joint_reference_fake_and_opcheck():
    """The reference backend is the reference; the registered op (its Python body here) with a split passes
    opcheck; the fake implementation takes norm_split."""
    q, k, v = make_inputs(1, 11, 11, 2, 1, 16, torch.float32, seed=15)
    kw = joint_options(q, 5, "half")
    assert torch.equal(gqa_attention(q, k, v, backend="reference", **kw), gqa_attention_ref(q, k, v, **kw))
    cos, sin = kw["rope"]
    args = (q, k, v, kw["q_norm"], kw["k_norm"], 1e-6, cos, sin, False, None, 0.25, 5)
    torch.library.opcheck(torch.ops.ditengine.gqa_attention, args)
    meta = torch.ops.ditengine.gqa_attention(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    assert meta.shape == q.shape and meta.device.type == "meta"


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention", ("reference", "triton")))
def test_joint_python_body_matches_reference(backend, monkeypatch):
    monkeypatch.setattr(gqa, "use_triton", lambda op, *tensors: backend == "triton")
    q, k, v = make_inputs(1, 45, 45, 2, 2, 32, torch.float32, seed=16)
    kw = joint_options(q, 37, "pairs")
    cos, sin = kw["rope"]
    python_impl = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out = torch.ops.ditengine.gqa_attention.default.redispatch(python_impl, q, k, v, kw["q_norm"], kw["k_norm"], 1e-6,
                                                               cos, sin, True, None, 32**-0.5, 37)
    check(out, q, k, v, f"joint python body ({backend})", **kw)


# -- the log-sum-exp and the exact merge (Ring attention) ------------------------------------------------------------
def check_lse(out, lse, q, k, v, name, **kw):
    """out as `check` does, and lse (B, T, Hq) fp32 contiguous against the reference's under the same rule:
    ref_hi and ref_lp as `references` builds them (the lse's scores in the inputs' dtype for ref_lp)."""
    B, T, HQ, _ = q.shape
    assert lse.shape == (B, T, HQ) and lse.dtype == torch.float32 and lse.is_contiguous(), name
    check(out, q, k, v, name, **kw)
    if q.dtype == torch.float32:
        _, lse_hi = gqa_attention_ref(q.double(), k.double(), v.double(), return_lse=True, **kw)
        _, lse_lp = gqa_attention_ref(q, k, v, return_lse=True, **kw)
    else:
        _, lse_hi = gqa_attention_ref(q, k, v, return_lse=True, **kw)
        _, lse_lp = gqa_attention_ref(q, k, v, upcast=False, return_lse=True, **kw)
    assert_within_tolerance(lse, lse_hi, lse_lp, fp32_floor(lse_hi), f"{name} lse")


# (B, T, S, Hq, Hkv, Dh, norm, rope, window), on every kernel: GQA 2 with the whole prologue and no window, a
# window with the prologue, a window without it (the split head dim 72), cross-attention (S != T) without a prologue
# and with a q norm only.
LSE_CASES = [(1, 37, 37, 4, 2, 64, "qk", "half", None), (1, 45, 45, 4, 2, 32, "qk", "pairs", 4),
             (1, 33, 33, 2, 1, 72, "", None, 4), (2, 29, 13, 4, 2, 32, "", None, None),
             (1, 17, 50, 4, 2, 16, "q", None, None)]
# The native kernel only: more keys than one 512-key block (the running max and sum carried across blocks), with a
# window whose second block a row may not reach, and a single query over 300 keys.
NATIVE_LSE_CASES = [(1, 600, 600, 4, 2, 16, "qk", "half", None), (1, 600, 600, 2, 1, 16, "", None, 250),
                    (1, 1, 300, 4, 2, 64, "", None, None)]


@pytest.mark.parametrize("backend, B, T, S, HQ, HKV, Dh, norm, rope, window, dtype", backend_cases({
    "native": [(*case, dtype) for case in LSE_CASES + NATIVE_LSE_CASES for dtype in NATIVE_DTYPES],
    "triton": [(*case, dtype) for case in LSE_CASES for dtype in INTERPRETER_DTYPES]}))
def test_lse_matches_reference(backend, B, T, S, HQ, HKV, Dh, norm, rope, window, dtype, request):
    """return_lse=True: the output as without it, and the natural-log log-sum-exp of the scaled scores after the
    prologue, over the keys each row sees; the Triton kernel in one launch, the native kernel as its lse op."""
    launches = count_launches(backend, request)
    q, k, v = make_inputs(B, T, S, HQ, HKV, Dh, dtype, seed=T + 2 * S + Dh)
    if S > 512:  # the largest logits in the second key block: the running max moves
        k = k.clone()
        k[:, S // 2:] *= 3.0
    kw = options(q, norm, rope, window)
    out, lse = runner(backend)(q, k, v, return_lse=True, **kw)
    if launches is not None:
        assert launches["_gqa_attention_fwd_kernel"] == 1
    name = f"{backend} T={T} S={S} Hq={HQ} Hkv={HKV} Dh={Dh} norm={norm} rope={rope} window={window}"
    check_lse(out, lse, q, k, v, name, **kw)
    assert torch.equal(out, runner(backend)(q, k, v, **kw)), f"{name}: return_lse changed the output"


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention_lse"))
def test_lse_zero_keys_give_zeros_and_minus_inf(backend):
    """A key shard of padding only (S = 0) with return_lse: out 0 in q's dtype, lse -inf, no NaN, on every backend
    and with the norms on; the lse op (C++ kernel and Python body) alike."""
    q, k, v = make_inputs(2, 7, 11, 4, 2, 32, torch.float32, seed=41)
    k, v = k[:, :0], v[:, :0]
    kw = options(q, "qk")
    for name, (out, lse) in (("function", gqa_attention(q, k, v, return_lse=True, backend=backend, **kw)),
                             ("op", native_op(q, k, v, return_lse=True, python_body=backend != "native", **kw))):
        assert out.shape == q.shape and out.dtype == q.dtype and torch.equal(out, torch.zeros_like(out)), name
        assert lse.shape == (2, 7, 4) and lse.dtype == torch.float32, name
        assert bool((lse == -torch.inf).all()), f"{backend} {name}: {lse}"


def key_blocks(k, v, bounds):
    """k, v cut along the keys at `bounds` (0, ..., S): one (k, v) pair per block, empty where two bounds meet."""
    return [(k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:])]


# Key-block bounds over S = 50 keys: 2 to 4 blocks, an all-padding block (no key) in the middle, and one first.
MERGE_SPLITS = [(0, 23, 50), (0, 17, 17, 50), (0, 9, 9, 31, 50), (0, 0, 12, 30, 50)]


@pytest.mark.parametrize("split", MERGE_SPLITS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("backend, dtype", backend_cases({"native": [(torch.float32,), (torch.bfloat16,)],
                                                          "triton": [(torch.float32,), (torch.float16,)]}))
def test_merged_key_blocks_match_the_whole_sequence(backend, dtype, split):
    """Ring attention's arithmetic: q attends each key block alone (return_lse), the partial results are merged in
    order into an fp32 accumulator, and the result is the attention over every key: out and lse within the rule
    of the whole sequence's reference (q and k norms on, 4 q heads over 2 kv heads)."""
    q, k, v = make_inputs(2, 19, 50, 4, 2, 32, dtype, seed=42)
    kw = options(q, "qk")
    run = runner(backend)
    blocks = key_blocks(k, v, split)
    out, lse = run(q, *blocks[0], return_lse=True, **kw)
    out = out.float()
    for kb, vb in blocks[1:]:
        out, lse = merge_attention(out, lse, *run(q, kb, vb, return_lse=True, **kw))
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    check_lse(out.to(dtype), lse, q, k, v, f"{backend} merged blocks {split}", **kw)


def test_merge_attention_of_keyless_sides():
    """-inf on one side gives the other side exactly, whatever the keyless side's out holds (NaN included), row by
    row; on both sides out 0 and lse -inf, never NaN; equal lse averages; a NaN lse gives NaN; bf16 in, fp32 out."""
    g = torch.Generator().manual_seed(43)
    out_a, out_b = torch.randn(2, 5, 3, 16, generator=g), torch.randn(2, 5, 3, 16, generator=g).bfloat16()
    lse_a, lse_b = torch.randn(2, 5, 3, generator=g) * 4, torch.randn(2, 5, 3, generator=g) * 4
    keyless_a = torch.rand(2, 5, 3, generator=g) < 0.3
    keyless_b = ~keyless_a & (torch.rand(2, 5, 3, generator=g) < 0.5)
    lse_a, lse_b = lse_a.masked_fill(keyless_a, -torch.inf), lse_b.masked_fill(keyless_b, -torch.inf)
    out_a = out_a.masked_fill(keyless_a[..., None], torch.nan)  # never read
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == out_a.shape and lse.shape == lse_a.shape
    assert torch.equal(out[keyless_a], out_b[keyless_a].float()) and torch.equal(lse[keyless_a], lse_b[keyless_a])
    assert torch.equal(out[keyless_b], out_a[keyless_b]) and torch.equal(lse[keyless_b], lse_a[keyless_b])
    both = ~keyless_a & ~keyless_b
    w = torch.softmax(torch.stack([lse_a, lse_b]), dim=0)[..., None]  # (2, B, T, H, 1)
    expected = w[0] * out_a.double().nan_to_num() + w[1] * out_b.double()
    torch.testing.assert_close(out[both].double(), expected[both], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[both], torch.logaddexp(lse_a, lse_b)[both])

    none = torch.full((2, 5, 3), -torch.inf)
    out, lse = merge_attention(torch.randn(2, 5, 3, 16, generator=g), none, torch.randn(2, 5, 3, 16, generator=g),
                               none)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -torch.inf).all())
    out, lse = merge_attention(out_b, lse_b, out_b, lse_b)
    assert torch.equal(out[~keyless_b], out_b.float()[~keyless_b])
    torch.testing.assert_close(lse[~keyless_b], lse_b[~keyless_b] + math.log(2))
    lse_nan = lse_a.clone()
    lse_nan[0, 0, 0] = torch.nan
    out, lse = merge_attention(out_a, lse_nan, out_b, lse_b)
    assert lse[0, 0, 0].isnan() and out[0, 0, 0].isnan().all() and not lse[1].isnan().any()


def test_merge_attention_traces_without_host_syncs():
    """Traced with fake tensors (no values): a branch on a tensor's value or a host sync would raise, so the merge
    captures into a CUDA graph whole; the traced graph computes what the eager call does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(44)
    args = (torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 4, 2, generator=g),
            torch.randn(1, 4, 2, 16, generator=g).half(), torch.full((1, 4, 2), -torch.inf))
    graph = make_fx(merge_attention, tracing_mode="fake")(*args)
    assert "_local_scalar_dense" not in str(graph.graph)
    for got, want in zip(graph(*args), merge_attention(*args)):
        assert torch.equal(got, want)


def test_lse_bad_arguments_name_them():
    """return_lse must be a bool; zero keys only with it; zero queries never; merge_attention's shapes, dtypes and
    devices, each error naming the argument."""
    q, k, v = make_inputs(1, 6, 6, 4, 2, 16, torch.float32, seed=45)
    for bad in (1, None, "yes", torch.tensor(True)):
        with pytest.raises(TypeError, match=r"return_lse: expected a bool, got "):
            gqa_attention(q, k, v, return_lse=bad)
    with pytest.raises(ValueError, match=r"got q 6, k 0 \(an empty key shard is taken with return_lse=True\)"):
        gqa_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="sequence lengths must be at least 1, got q 0, k 6"):
        gqa_attention(q[:, :0], k, v, return_lse=True)
    with pytest.raises(ValueError, match="window: a sliding window is for self-attention and needs S = T, got S=0"):
        gqa_attention(q, k[:, :0], v[:, :0], window=2, return_lse=True)

    o, lse = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3)
    for args, exc, match in (
            ((o[0], lse, o, lse), ValueError, r"out: expected 4 dimensions \(B, T, H, Dh\), got shape \(5, 3, 16\)"),
            ((o, lse[:, :4], o, lse), ValueError, r"lse: expected shape \(2, 5, 3\) \(B, T, H\): out's log-sum-exp"),
            ((o, lse.bfloat16(), o, lse), TypeError, r"lse: expected dtype in \['float32'\], got bfloat16"),
            ((o, lse, o[:, :4], lse), ValueError, r"out_b: expected shape \(2, 5, 3, 16\) \(B, T, H, Dh\) like out"),
            ((o, lse, o.long(), lse), TypeError, "out_b: expected dtype in .*, got int64"),
            ((o, lse, o, lse.double()), TypeError, r"lse_b: expected dtype in \['float32'\], got float64"),
            ((o, lse, o, lse.to("meta")), ValueError, "lse_b: on meta, expected cpu like the other inputs"),
            ((o, lse, o.numpy(), lse), TypeError, "out_b: expected a torch.Tensor, got ndarray")):
        with pytest.raises(exc, match=match):
            merge_attention(*args)


@pytest.mark.parametrize("bad, backend", [p for p in bad_input_params() if p.values[1].startswith("op")
                                          and p.values[0].id != "k-no-tokens"])
def test_lse_op_checks_as_the_op(bad, backend):
    """The lse op called directly (its C++ kernel, or its Python body) checks every bad input of the table as
    `gqa_attention`'s op does: the same exception and message naming the argument (an empty k aside: the lse op
    takes it)."""
    call = {**valid_call(), "return_lse": True}
    call.update(bad.over(call))
    call.pop("backend", None)
    expect = op_expectation(bad, backend, call)
    if expect.exc is None:
        out, lse = native_op(**call)
        assert out.shape == call["q"].shape and lse.shape == call["q"].shape[:3]
        return
    with pytest.raises(expect.exc, match=expect.match):
        native_op(**call)


@pytest.mark.parametrize("backend", cpu_backends("gqa_attention_lse", ("reference", "triton")))
def test_lse_python_body_matches_reference(backend, monkeypatch):
    """The lse op's Python implementation past the native kernel: the Triton kernel where `use_triton` says so (as
    on CUDA; here the interpreter), else the reference."""
    monkeypatch.setattr(gqa, "use_triton", lambda op, *tensors: backend == "triton")
    q, k, v = make_inputs(1, 21, 21, 4, 2, 32, torch.float32, seed=46)
    kw = options(q, "qk", "pairs", 4)
    out, lse = native_op(q, k, v, python_body=True, return_lse=True, **kw)
    check_lse(out, lse, q, k, v, f"lse python body ({backend})", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lse_op_passes_opcheck_and_fake(dtype):
    """The lse op (its C++ kernel where built) with the prologue and a window, without a window (bf16 on AMX: ATen's
    flash branch), and with no key, passes opcheck; its fake implementation gives (out in q's dtype, lse fp32) on
    meta tensors."""
    q, k, v = make_inputs(1, 9, 9, 4, 2, 16, dtype, seed=47)
    kw = options(q, "qk", "half", 3)
    cos, sin = kw["rope"]
    args = (q, k, v, kw["q_norm"], kw["k_norm"], 1e-6, cos, sin, False, 3, 0.25)
    torch.library.opcheck(torch.ops.ditengine.gqa_attention_lse, args)
    # No key: contiguous empty k and v (opcheck's input cloning cannot copy an empty view of the fused projection).
    for kk, vv in ((k, v), (k.new_empty(1, 0, 2, 16), v.new_empty(1, 0, 2, 16))):
        torch.library.opcheck(torch.ops.ditengine.gqa_attention_lse,
                              (q, kk, vv, kw["q_norm"], kw["k_norm"], 1e-6, None, None, False, None, 0.25))
    out, lse = torch.ops.ditengine.gqa_attention_lse(*(a.to("meta") if isinstance(a, torch.Tensor) else a
                                                       for a in args))
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == "meta"
    assert lse.shape == (1, 9, 4) and lse.dtype == torch.float32


# -- GPU -----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T, window", [(375, 128), (375, None), (3000, 128), (3000, None)])
def test_gpu_ace_step_self_attention(T, window, dtype):
    q, k, v = make_inputs(2, T, T, 16, 8, 128, dtype, device="cuda")
    assert choose("gqa_attention", q.device) == "triton"
    kw = options(q, "qk", "half", window)
    check(gqa_attention(q, k, v, **kw), q, k, v, f"cuda T={T} window={window}", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, S, HQ, HKV, Dh, norm, rope, window", KERNEL_CASES + NATIVE_CASES)
def test_gpu_odd_shapes_fp32(B, T, S, HQ, HKV, Dh, norm, rope, window):
    q, k, v = make_inputs(B, T, S, HQ, HKV, Dh, torch.float32, device="cuda")
    kw = options(q, norm, rope, window)
    check(gqa_attention(q, k, v, **kw), q, k, v, f"cuda fp32 T={T} S={S} Dh={Dh} window={window}", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS,
                         ids=lambda c: "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}".format(**c))
def test_gpu_every_autotune_config(config):
    q, k, v = make_inputs(2, 375, 375, 16, 8, 128, torch.bfloat16, device="cuda")
    kw = options(q, "qk", "half", 128)
    check(gqa_attention(q, k, v, backend="triton", config=config, **kw), q, k, v, f"config {config}", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("first, second, heads, Dh, rope", [(1024, 333, 24, 64, None), (512, 1536, 24, 128, "pairs"),
                                                           (1024, 333, 4, 64, "half")], ids=["sd3", "flux", "half"])
def test_gpu_joint_attention(first, second, heads, Dh, rope, dtype):
    """SD3.5's [image; text] (24 heads x 64) and Flux's [text; image] (24 x 128, interleaved RoPE) on CUDA."""
    T = first + second
    q, k, v = make_inputs(1, T, T, heads, heads, Dh, dtype, device="cuda")
    kw = joint_options(q, first, rope)
    check(gqa_attention(q, k, v, **kw), q, k, v, f"cuda joint {first}+{second} Dh={Dh} rope={rope}", **kw)
