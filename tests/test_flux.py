"""Flux.1 through the fast path: FastSampler against ditengine's reference loop (dev with its embedded guidance,
schnell, true CFG), the joint [text; image] residual stream, graphs, int8 and step caching."""
import pytest
import torch

import ditengine as de
from ditengine.fast import FastFlux
from ditengine.models.flux import Flux, FluxConfig

from support.diffusers_models import randomize
from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance

S = de.schedulers
L = 7
TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))


def flux(seed=0, dev=True, **overrides) -> Flux:
    return randomize(Flux(FluxConfig(guidance_embeds=dev, **{**TINY, **overrides})), seed, std=0.2).eval()


def schedule(steps=4, tokens=16):
    sigmas = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).tolist()
    return S.FlowMatchEuler(sigmas=sigmas, use_dynamic_shifting=True, mu=0.5 + 0.00016 * tokens)


def conditioning(model, B=2, seed=1, negative=False):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    cond = dict(prompt_embeds=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(B, cfg.pooled_projection_dim, generator=g))
    if cfg.guidance_embeds:
        cond["guidance"] = 3.5
    if negative:
        cond.update(negative_prompt_embeds=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(B, cfg.pooled_projection_dim, generator=g))
    return cond


def noise(B=2, hw=(8, 6), seed=2):
    return torch.randn(B, 4, *hw, generator=torch.Generator().manual_seed(seed))


def reference(sched, z, cfg_scale=1.0, **cond):
    return lambda m: de.sample(m, sched, z, cfg_scale=cfg_scale, progress=False, **cond)


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_run_matches_the_reference_in_fp32(dev):
    model, sched = flux(dev=dev), schedule()
    cond, z = conditioning(model), noise()
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert got.shape == z.shape
    assert_fp32_run_within_tolerance(got, reference(sched, z, **cond), model, f"Flux dev={dev}", steps=len(sched))


def test_true_cfg_with_a_negative_prompt():
    model, sched = flux(seed=3), schedule(3)
    cond, z = conditioning(model, negative=True), noise()
    got = de.FastSampler(model, sched, cfg_scale=4.0, dtype=torch.float32)(z, **cond)
    assert_fp32_run_within_tolerance(got, reference(sched, z, 4.0, **cond), model, "Flux true CFG", steps=len(sched))


def test_bf16_forward_within_the_tolerance_rule():
    """bf16 with Flux's rounding of t and g to the latent dtype before the embedding."""
    model = flux()
    cond, x = conditioning(model), noise()
    fast = FastFlux(model, torch.bfloat16)
    inputs = fast.inputs(model, x, False, **cond)
    ctx = fast.context_buffers(2, tuple(x.shape[1:]), inputs)
    fast.write_context(ctx, inputs, False)
    t = torch.tensor([910.0, 333.0])
    mod = tuple(m[torch.arange(2), torch.arange(2)] for m in fast.modulation(t, ctx))  # row i at t[i]
    forward = de.sampling.reference_forward
    with torch.no_grad():
        got = fast.forward(x.bfloat16(), mod, ctx).float()
        ref32 = forward(model, x, False, **cond)(x, t, 0)
        low = flux().bfloat16()
        ref_lp = forward(low, x, False, **cond)(x.bfloat16(), t, 0).float()
    assert ref32.abs().max() > 0.5
    assert_within_tolerance(got, ref32, ref_lp, 1e-2, "Flux bf16 fused forward")


def test_graph_modes_plans_and_ids():
    model, sched = flux(), schedule(3)
    cond, z = conditioning(model), noise()
    runs = {mode: de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32, cuda_graph=mode)(z, **cond)
            for mode in (None, "step", "loop")}
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
    sampler = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)
    wide = sampler(noise(hw=(4, 10)), **cond)
    assert wide.shape == (2, 4, 4, 10)
    ids = torch.rand(L, 3) * 5  # other position ids reach the RoPE tables
    assert not torch.equal(sampler(z, txt_ids=ids, **cond), runs[None])


def test_bad_inputs_name_the_argument():
    model, sched = flux(), schedule(2)
    sampler = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)
    cond = conditioning(model)
    with pytest.raises(ValueError, match="noise: expected VAE latents"):
        sampler(noise(hw=(7, 6)), **cond)
    with pytest.raises(ValueError, match="guidance: required by this Flux"):
        sampler(noise(), **{k: v for k, v in cond.items() if k != "guidance"})
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds: expected \(2, 12\)"):
        sampler(noise(), **{**cond, "pooled_prompt_embeds": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="negative_prompt_embeds, negative_pooled_prompt_embeds: required"):
        de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32)(noise(), **cond)
