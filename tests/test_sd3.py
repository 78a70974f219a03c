"""SD3 / SD3.5 through the fast path: FastSampler against ditengine's reference loop (CFG, SD3.5's dual attention
and q/k norm), the joint [image; text] residual stream, graphs, int8 and step caching."""
import pytest
import torch

import ditengine as de
from ditengine.cache import FirstBlockCache, StaticCache
from ditengine.fast import FastSD3
from ditengine.models.sd3 import SD3, SD3Config

from support.diffusers_models import randomize
from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance

S = de.schedulers
L = 7
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
            num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=12,
            pos_embed_max_size=16)
FLAVOURS = {"sd3": dict(), "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def sd3(seed=0, flavour="sd35", **overrides) -> SD3:
    return randomize(SD3(SD3Config(**{**TINY, **FLAVOURS[flavour], **overrides})), seed, std=0.2).eval()


def schedule(steps=4):
    return S.FlowMatchEuler(steps, shift=3.0)


def conditioning(model, B=2, seed=1, negative=True):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    cond = dict(prompt_embeds=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(B, cfg.pooled_projection_dim, generator=g))
    if negative:
        cond.update(negative_prompt_embeds=torch.randn(B, L, cfg.joint_attention_dim, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(B, cfg.pooled_projection_dim, generator=g))
    return cond


def noise(B=2, hw=(8, 6), seed=2):
    return torch.randn(B, 4, *hw, generator=torch.Generator().manual_seed(seed))


def reference(sched, z, cfg_scale, **cond):
    return lambda m: de.sample(m, sched, z, cfg_scale=cfg_scale, progress=False, **cond)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("cfg_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_run_matches_the_reference_in_fp32(flavour, cfg_scale):
    model, sched = sd3(flavour=flavour), schedule()
    cond, z = conditioning(model, negative=cfg_scale != 1.0), noise()
    got = de.FastSampler(model, sched, cfg_scale=cfg_scale, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert got.shape == z.shape
    assert_fp32_run_within_tolerance(got, reference(sched, z, cfg_scale, **cond), model,
                                     f"{flavour} cfg={cfg_scale}", steps=len(sched))


def test_head_dim_64_non_square_latent_in_fp32():
    """The released models' head dim (64) and a latent off the position table's centre, SD3.5 with CFG."""
    model, sched = sd3(seed=5, attention_head_dim=64, caption_projection_dim=128), schedule(2)
    cond, z = conditioning(model), noise(hw=(10, 6))
    got = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32)(z, **cond)
    assert_fp32_run_within_tolerance(got, reference(sched, z, 4.5, **cond), model, "SD3.5 Dh 64", steps=2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_other_kernel_backends_match_the_reference(backend):
    model, sched = sd3(seed=4, num_layers=2, dual_attention_layers=(1,)), schedule(2)
    cond, z = conditioning(model), noise(hw=(6, 4))
    got = de.FastSampler(model, sched, cfg_scale=4.0, dtype=torch.float32, backend=backend)(z, **cond)
    assert_fp32_run_within_tolerance(got, reference(sched, z, 4.0, **cond), model, f"SD3.5 {backend}", steps=2)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_bf16_forward_within_the_tolerance_rule(flavour):
    model = sd3(flavour=flavour)
    cond, x = conditioning(model, negative=False), noise()
    fast = FastSD3(model, torch.bfloat16)
    inputs = fast.inputs(model, x, False, **cond)
    ctx = fast.context_buffers(2, tuple(x.shape[1:]), inputs)
    fast.write_context(ctx, inputs, False)
    t = torch.tensor([910.0, 333.0])
    mod = tuple(m[torch.arange(2), torch.arange(2)] for m in fast.modulation(t, ctx))  # row i at t[i]
    forward = de.sampling.reference_forward
    with torch.no_grad():
        got = fast.forward(x.bfloat16(), mod, ctx).float()
        ref32 = forward(model, x, False, **cond)(x, t, 0)
        low = sd3(flavour=flavour).bfloat16()
        ref_lp = forward(low, x, False, **cond)(x.bfloat16(), t, 0).float()
    assert ref32.abs().max() > 0.5
    assert_within_tolerance(got, ref32, ref_lp, 1e-2, f"{flavour} bf16 fused forward")


def test_graph_modes_plans_and_shapes():
    model, sched = sd3(), schedule(3)
    cond, z = conditioning(model), noise()
    runs = {mode: de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32, cuda_graph=mode)(z, **cond)
            for mode in (None, "step", "loop")}
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
    sampler = de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32)
    assert sampler(noise(hw=(4, 10)), **cond).shape == (2, 4, 4, 10)
    longer = {k: torch.cat([v, v[:, :3]], 1) if v.dim() == 3 else v for k, v in cond.items()}
    assert not torch.equal(sampler(z, **longer), runs[None])  # a new text length: a plan of its own
    assert sampler.captures == 2  # one plan per (image size, text length)


def test_cfg_interval_runs_the_conditional_rows_alone_outside_it():
    model, sched = sd3(), schedule(4)
    cond, z = conditioning(model), noise()
    interval = (0.0, float(sched.timesteps[1]))
    got = de.FastSampler(model, sched, cfg_scale=4.0, dtype=torch.float32, cfg_interval=interval)(z, **cond)
    want = de.sample(model, sched, z, cfg_scale=4.0, progress=False, cfg_interval=interval, **cond)
    assert float((got - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("policy", [StaticCache(2, warmup=1, cooldown=1), StaticCache(2, warmup=1, cooldown=1,
                                                                                      reuse="blocks"),
                                    FirstBlockCache(10.0)], ids=str)
def test_step_caching_without_dual_attention(policy):
    """SD3 (no second attention, no q/k norm) beside the conformance suite's SD3.5 case: the fused cached run
    equals the reference cached run, decision for decision."""
    model, sched = sd3(flavour="sd3"), schedule(6)
    cond, z = conditioning(model), noise()
    want_stats = {}

    def run(m, stats=None):
        return de.sample(m, sched, z, cfg_scale=3.0, cache=policy, stats=stats, progress=False, **cond)

    run(model, want_stats)
    sampler = de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32, cache=policy)
    got = sampler(z, **cond)
    assert want_stats["cached_steps"] and sampler.stats["cached_steps"] == want_stats["cached_steps"]
    assert sampler.stats["block_evals"] == want_stats["block_evals"] < want_stats["block_evals_uncached"]
    assert_fp32_run_within_tolerance(got, run, model, f"sd3 {policy}", steps=2 * len(sched))


def test_bad_inputs_name_the_argument():
    model, sched = sd3(), schedule(2)
    sampler = de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32)
    cond = conditioning(model)
    with pytest.raises(ValueError, match="noise: expected shape"):
        sampler(noise(hw=(7, 6)), **cond)
    with pytest.raises(ValueError, match="exceeds this SD3's position table"):
        sampler(noise(hw=(34, 6)), **cond)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds: expected \(2, 12\)"):
        sampler(noise(), **{**cond, "pooled_prompt_embeds": torch.randn(2, 5)})
    with pytest.raises(ValueError, match=r"prompt_embeds: expected \(2, L, 24\) \(CLIP \+ T5 tokens"):
        sampler(noise(), **{**cond, "prompt_embeds": torch.randn(2, L, 23)})
    with pytest.raises(ValueError, match="negative_prompt_embeds, negative_pooled_prompt_embeds: required"):
        sampler(noise(), **conditioning(model, negative=False))
    with pytest.raises(ValueError, match="negative_prompt_embeds: 9 tokens, expected 7"):
        sampler(noise(), **{**cond, "negative_prompt_embeds": torch.randn(2, 9, 24)})


def test_a_one_token_grid_runs_through_the_fused_path():
    """A 1 x 1 token grid (16 px through a pipeline without a VAE): the unembed's output is a permuted view, which
    the loop makes contiguous before the scheduler step; the run equals the reference loop."""
    model, sched = sd3(), schedule()
    cond = conditioning(model)
    p = model.config.patch_size
    z = torch.randn(2, model.config.in_channels, p, p, generator=torch.Generator().manual_seed(3))
    got = de.FastSampler(model, sched, cfg_scale=3.0, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert got.shape == z.shape
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, z, cfg_scale=3.0, progress=False, **cond),
                                     model, "SD3 1x1 grid", steps=len(sched))
