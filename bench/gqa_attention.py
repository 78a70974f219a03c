"""Microbenchmark of `gqa_attention` (GQA + q/k RMSNorm + RoPE prologue + sliding window) on a CPU.

ACE-Step 1.5's self-attention at 30 s of audio: B = 2 (a batch of two songs, or CFG), T = 375 tokens,
16 q heads over 8 kv heads, Dh = 128, fp32, full attention and the sliding layers' band |i - j| <= 128. q, k
and v are column views of one fused projection output (B, T, (16 + 2*8)*128), as the engine's fused
projection gives them. Providers, all timed round-robin in one process:

- "native": the op (csrc/gqa_attention.cpp), from the views to the (B, T, Hq*Dh) output-projection input;
- "eager": what diffusers' `AceStepAttnProcessor2_0` runs with the SDPA backend: RMSNorm (fp32 statistic)
  and RoPE (fp32) as torch ops, SDPA with `enable_gqa` and, for the sliding layers, a boolean band mask (the
  model passes an additive one; same keys), the transpose back;
- "sdpa only": SDPA on q and k already normalised and rotated, the attention alone, for scale.

Joint attention (SD3.5's size, B = 1, 1024 image + 333 text tokens, 24 heads x 64, fp32, with Flux's
interleaved RoPE over all rows): "native" with (2, Dh) per-stream norm weights split at 1024 against "eager",
the two streams' norms on their row ranges, the concatenation, RoPE and SDPA.

GFLOP/s count 4 * Dh per visible (query, key) pair and q head (the band's pairs only with the window), the
work the native kernel does. `python -m ditengine.bench.gqa_attention` (`--quick`: one small case).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ditengine.kernels import _native
from ditengine.kernels.gqa_attention import band_mask, gqa_attention, rms_norm_ref, rope_ref

from .timing import run_kernel_bench

# (B, T, Hq, Hkv, Dh, window)
CPU_CASES = [(2, 375, 16, 8, 128, None), (2, 375, 16, 8, 128, 128)]
CPU_QUICK = [(1, 40, 4, 2, 64, 8)]
# (B, first stream's tokens, second stream's tokens, heads, Dh): one joint attention, per-stream norm weights
JOINT_CASES = [(1, 1024, 333, 24, 64)]
JOINT_QUICK = [(1, 30, 11, 2, 64)]


def rope_tables(T: int, Dh: int, theta: float = 1e6, interleaved: bool = False):
    """ACE-Step's cos, sin (T, Dh): `get_1d_rotary_pos_embed(Dh, arange(T), theta, use_real=True,
    repeat_interleave_real=interleaved)`, written out (the halves repeat; interleaved: each angle twice in a row,
    Flux's pairing)."""
    freqs = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)  # (T, Dh/2)
    if interleaved:
        return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    return torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)


def fused_views(B, T, HQ, HKV, Dh, dtype, device="cpu", seed=0):
    """q (B, T, Hq, Dh), k, v (B, T, Hkv, Dh): column views of one (B, T, (Hq + 2*Hkv)*Dh) projection output."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, T, (HQ + 2 * HKV) * Dh, generator=g).to(device=device, dtype=dtype)
    q, k, v = proj.split([HQ * Dh, HKV * Dh, HKV * Dh], dim=-1)
    return q.unflatten(-1, (HQ, Dh)), k.unflatten(-1, (HKV, Dh)), v.unflatten(-1, (HKV, Dh))


def eager(q, k, v, w_q, w_k, cos, sin, window, eps=1e-6):
    """diffusers' processor with the SDPA backend, from the projection views to the (B, T, Hq*Dh) output."""
    B, T, HQ, Dh = q.shape
    q, k = rms_norm_ref(q, w_q, eps), rms_norm_ref(k, w_k, eps)
    q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    mask = None if window is None else band_mask(T, T, window, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=HQ != k.shape[2])  # (B, Hq, T, Dh)
    return out.transpose(1, 2).reshape(B, T, HQ * Dh)


def eager_joint(q, k, v, w_q, w_k, split, cos, sin, eps=1e-6):
    """Joint attention as diffusers' processors run it: each stream's q / k RMSNorm on its rows, the joint
    sequence, interleaved RoPE (Flux), SDPA; from the (B, T, H, Dh) views to the (B, T, H*Dh) output."""
    B, T, H, Dh = q.shape
    q = torch.cat([rms_norm_ref(q[:, :split], w_q[0], eps), rms_norm_ref(q[:, split:], w_q[1], eps)], dim=1)
    k = torch.cat([rms_norm_ref(k[:, :split], w_k[0], eps), rms_norm_ref(k[:, split:], w_k[1], eps)], dim=1)
    q, k = rope_ref(q, cos, sin, True), rope_ref(k, cos, sin, True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, Dh)
    return out.transpose(1, 2).reshape(B, T, H * Dh)


def joint_cases(device, quick: bool = False):
    for B, first, second, H, Dh in JOINT_QUICK if quick else JOINT_CASES:
        T = first + second
        q, k, v = fused_views(B, T, H, H, Dh, torch.float32, device)
        g = torch.Generator().manual_seed(2)
        w_q, w_k = (1 + 0.1 * torch.randn(2, 2, Dh, generator=g)).to(device).unbind(0)  # (2, Dh) each
        cos, sin = (t.to(device) for t in rope_tables(T, Dh, 1e4, interleaved=True))
        providers = {}
        if _native.serves("gqa_attention") and device.type == "cpu":
            providers["native"] = lambda q=q, k=k, v=v, w_q=w_q, w_k=w_k, split=first, cos=cos, sin=sin: (
                gqa_attention(q, k, v, q_norm=w_q, k_norm=w_k, norm_split=split, rope=(cos, sin),
                              rope_interleaved=True).flatten(2))
        providers["eager"] = lambda q=q, k=k, v=v, w_q=w_q, w_k=w_k, split=first, cos=cos, sin=sin: (
            eager_joint(q, k, v, w_q, w_k, split, cos, sin))
        label = f"joint B={B} T={first}+{second} H={H} Dh={Dh} interleaved RoPE"
        yield label, torch.float32, 4 * B * H * Dh * T * T, providers


def cases(device, quick: bool = False):
    for B, T, HQ, HKV, Dh, window in CPU_QUICK if quick else CPU_CASES:
        dtype = torch.float32
        q, k, v = fused_views(B, T, HQ, HKV, Dh, dtype, device)
        g = torch.Generator().manual_seed(1)
        w_q, w_k = (1 + 0.1 * torch.randn(2, Dh, generator=g)).to(device).unbind(0)
        cos, sin = (t.to(device) for t in rope_tables(T, Dh))
        providers = {}
        if _native.serves("gqa_attention") and device.type == "cpu":
            providers["native"] = lambda q=q, k=k, v=v, w_q=w_q, w_k=w_k, cos=cos, sin=sin, window=window: (
                gqa_attention(q, k, v, q_norm=w_q, k_norm=w_k, rope=(cos, sin), window=window).flatten(2))
        providers["eager"] = lambda q=q, k=k, v=v, w_q=w_q, w_k=w_k, cos=cos, sin=sin, window=window: (
            eager(q, k, v, w_q, w_k, cos, sin, window))
        q_r = rope_ref(rms_norm_ref(q, w_q, 1e-6), cos, sin).transpose(1, 2).contiguous()
        k_r = rope_ref(rms_norm_ref(k, w_k, 1e-6), cos, sin).transpose(1, 2).contiguous()
        v_t = v.transpose(1, 2).contiguous()
        mask = None if window is None else band_mask(T, T, window, device)
        providers["sdpa only (q, k prepared)"] = lambda q_r=q_r, k_r=k_r, v_t=v_t, mask=mask: (
            F.scaled_dot_product_attention(q_r, k_r, v_t, attn_mask=mask, enable_gqa=True))
        pairs = T * T if window is None else int(band_mask(T, T, window).sum())
        label = f"B={B} T={T} Hq={HQ} Hkv={HKV} Dh={Dh} window={window}"
        yield label, dtype, 4 * B * HQ * Dh * pairs, providers
    yield from joint_cases(device, quick)


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    opts, rest = pre.parse_known_args(argv)
    note = ("gqa_attention: CPU rows time the native kernel (csrc/gqa_attention.cpp) against the eager torch path "
            "(norm + RoPE + SDPA)" if _native.serves("gqa_attention") else
            "gqa_attention: the native extension has no gqa_attention kernel here (native rows left out)")
    return run_kernel_bench("gqa_attention", lambda device: cases(device, opts.quick), rest, metric="flops",
                            baseline="eager", cpu_note=note, cpu_repeats=5 if opts.quick else 40)


if __name__ == "__main__":
    raise SystemExit(main())
