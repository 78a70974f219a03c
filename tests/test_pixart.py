"""PixArt-alpha/sigma through the engine: the fast path against the reference spec, `accelerate` against the
diffusers pipelines' own latents, step caching and the bad inputs of a text-conditioned family."""
import pytest
import torch

import ditengine as de
from ditengine.models.pixart import PixArt, PixArtConfig

from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance

S = de.schedulers
# Head dim 16 (the attention kernels' smallest), two layers; 8x8 latents, 16 tokens.
SMALL = dict(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=3, caption_channels=24,
             cross_attention_dim=48, in_channels=4, out_channels=8)
B, L = 3, 7


def pixart(seed=0, **overrides):
    torch.manual_seed(seed)
    model = PixArt(PixArtConfig(**{**SMALL, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter live, the zero-initialised tables included
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def mask(lengths, L=L):
    return (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()


def conditioning(model, lengths=(L, 3, 1), neg_lengths=(1, 1, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    width = model.config.caption_channels or model.config.cross_attention_dim
    n = len(lengths)
    return dict(prompt_embeds=torch.randn(n, L, width, generator=g), prompt_attention_mask=mask(lengths),
                negative_prompt_embeds=torch.randn(n, L, width, generator=g),
                negative_prompt_attention_mask=mask(neg_lengths))


def noise(batch=B, hw=(8, 8), seed=2):
    return torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(seed))


MASKS = {"full": (L, L, L), "partial": (L, 3, 5), "one-token": (1, 1, 1), "mixed": (L, 3, 1)}


@pytest.mark.parametrize("lengths", MASKS.values(), ids=MASKS)
@pytest.mark.parametrize("make", [lambda: S.DPMSolverPP(4), lambda: S.DDIM(4, eta=0.5)], ids=["dpm++", "ddim-eta"])
def test_fast_sampler_matches_the_reference_in_fp32(make, lengths):
    model, sched = pixart(), make()
    cond, z = conditioning(model, lengths), noise()
    got = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32, cuda_graph=None)(
        z, generator=torch.Generator().manual_seed(3), **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(
        m, sched, z, cfg_scale=4.5, generator=torch.Generator().manual_seed(3), progress=False, **cond), model,
        "PixArt fused sampler")


def test_bf16_forward_within_the_tolerance_rule():
    from ditengine.fast import FastPixArt

    model = pixart()
    cond, x = conditioning(model), noise()
    t = torch.tensor([20.0, 500.0, 980.0])
    fast = FastPixArt(model, torch.bfloat16)
    inputs = fast.inputs(model, x, False, **{k: cond[k] for k in ("prompt_embeds", "prompt_attention_mask")})
    ctx = fast.context_buffers(B, tuple(x.shape[1:]), inputs)
    fast.write_context(ctx, inputs, False)
    mod = tuple(m[torch.arange(B), torch.arange(B)] for m in fast.modulation(t, ctx))  # row i at t[i]
    with torch.no_grad():
        got = fast.forward(x.bfloat16(), mod, ctx).float()
        call = dict(encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                    encoder_attention_mask=cond["prompt_attention_mask"])
        ref32 = model(x, **call)
        ref_lp = pixart().bfloat16()(x.bfloat16(), **{**call, "encoder_hidden_states": call[
            "encoder_hidden_states"].bfloat16()}).float()
    assert ref32.abs().max() > 0.5
    assert_within_tolerance(got, ref32, ref_lp, 1e-2, "PixArt bf16 fused forward")


def test_graph_modes_and_plans():
    model, sched = pixart(), S.DPMSolverPP(3)
    cond, z = conditioning(model), noise()
    sampler = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32, cuda_graph="loop")
    runs = {mode: de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32, cuda_graph=mode)(z, **cond)
            for mode in (None, "step")}
    runs["loop"] = sampler(z, **cond)
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
    # Another prompt of the same length reuses the plan: its K/V and lengths are written into the same buffers.
    other = conditioning(model, lengths=(2, L, 4), seed=9)
    second = sampler(z, **other)
    assert sampler.captures == 1 and not torch.equal(second, runs["loop"])
    expected = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32, cuda_graph=None)(z, **other)
    assert torch.equal(second, expected)
    # A non-square latent (PixArt is multi-aspect) and a longer prompt each build their own plan.
    wide = sampler(noise(hw=(6, 10)), **cond)
    assert wide.shape == (B, 4, 6, 10) and sampler.captures == 2
    assert_fp32_run_within_tolerance(wide, lambda m: de.sample(m, sched, noise(hw=(6, 10)), cfg_scale=4.5,
                                                               progress=False, **cond), model, "6x10 latent")


def test_without_guidance_no_negative_prompt_is_needed():
    model, sched = pixart(), S.DDIM(3)
    cond = {k: v for k, v in conditioning(model).items() if not k.startswith("negative")}
    got = de.FastSampler(model, sched, cfg_scale=1.0, dtype=torch.float32)(noise(), **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, noise(), cfg_scale=1.0, progress=False,
                                                              **cond), model, "unguided PixArt")


def test_micro_conditions_reach_the_fast_path():
    model = pixart(attention_head_dim=16, num_attention_heads=3, use_additional_conditions=True)
    sched = S.DPMSolverPP(3)
    cond = conditioning(model)
    added = {"resolution": torch.tensor([[64.0, 48.0]] * B), "aspect_ratio": torch.tensor([[4 / 3]] * B)}
    got = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32)(noise(), added_cond_kwargs=added, **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, noise(), cfg_scale=4.5, progress=False,
                                                              added_cond_kwargs=added, **cond), model, "alpha-1024")
    other = {"resolution": torch.tensor([[32.0, 64.0]] * B), "aspect_ratio": torch.tensor([[0.5]] * B)}
    assert not torch.equal(got, de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32)(
        noise(), added_cond_kwargs=other, **cond))
    with pytest.raises(ValueError, match="added_cond_kwargs: this PixArt uses micro-conditions"):
        de.FastSampler(model, sched, dtype=torch.float32)(noise(), **cond)


def test_tiny_head_dims_run_the_reference_attention(caplog):
    """diffusers' own test config has head dim 2, below the kernels' 16: the fast path still runs (logged)."""
    model = pixart(attention_head_dim=4, num_attention_heads=2, cross_attention_dim=8, caption_channels=None)
    sched = S.DPMSolverPP(3)
    cond = conditioning(model)
    with caplog.at_level("INFO", logger="ditengine"):
        got = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32)(noise(), **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, noise(), cfg_scale=4.5, progress=False,
                                                              **cond), model, "head dim 4")


def test_bad_text_inputs():
    model, sched = pixart(), S.DDIM(2)
    sampler = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.float32)
    cond, z = conditioning(model), noise()
    holes = dict(cond, prompt_attention_mask=torch.tensor([[1, 0, 1, 1, 0, 0, 0]] * B))
    with pytest.raises(ValueError, match="prompt_attention_mask: only right-padded masks"):
        sampler(z, **holes)
    with pytest.raises(ValueError, match="negative_prompt_attention_mask: every row needs at least one valid token"):
        sampler(z, **dict(cond, negative_prompt_attention_mask=torch.zeros(B, L, dtype=torch.long)))
    with pytest.raises(ValueError, match="negative_prompt_embeds: required with guidance"):
        sampler(z, prompt_embeds=cond["prompt_embeds"])
    with pytest.raises(ValueError, match=r"prompt_embeds: expected shape \(3, L, 24\)"):
        sampler(z, **dict(cond, prompt_embeds=torch.randn(B, L, 16)))
    with pytest.raises(ValueError, match=r"negative_prompt_embeds: 5 tokens, expected 7"):
        sampler(z, **dict(cond, negative_prompt_embeds=torch.randn(B, 5, 24), negative_prompt_attention_mask=None))
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, 4, H, W\) with H and W multiples"):
        sampler(torch.randn(B, 4, 7, 8), **cond)


# -- diffusers: conversion, checkpoints and the pipelines -------------------------------------------------------
def diffusers_pixart(sample_size=8, **overrides):
    diffusers = pytest.importorskip("diffusers")
    config = dict(sample_size=sample_size, num_layers=2, attention_head_dim=16, num_attention_heads=3,
                  caption_channels=24, cross_attention_dim=48, in_channels=4, out_channels=8, **overrides)
    transformer = diffusers.PixArtTransformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def test_from_diffusers_and_load_checkpoint_give_the_same_model(tmp_path):
    transformer = diffusers_pixart()
    model = de.from_diffusers(transformer)
    assert isinstance(model, PixArt)
    transformer.save_pretrained(tmp_path)
    loaded = de.load_checkpoint(tmp_path)
    assert isinstance(loaded, PixArt) and loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    from ditengine.models.pixart import to_diffusers_state_dict

    state = dict(to_diffusers_state_dict(model))
    again = de.load_checkpoint(state, pixart_config=dict(transformer.config))
    assert torch.equal(again.blocks[1].cross_attn.kv_linear.weight, model.blocks[1].cross_attn.kv_linear.weight)
    original = de.load_checkpoint(model.state_dict(), pixart_config=model.config)  # original PixArt key names
    assert torch.equal(original.t_block[1].weight, model.t_block[1].weight)


def pipeline(kind="sigma", scheduler="dpm", sample_size=8):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    schedulers = {"dpm": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler}
    cls = diffusers.PixArtSigmaPipeline if kind == "sigma" else diffusers.PixArtAlphaPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=diffusers_pixart(sample_size),
               scheduler=schedulers[scheduler]())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(text_width=24, rows=2, steps=4, **overrides):
    g = torch.Generator().manual_seed(4)
    return dict(prompt_embeds=torch.randn(rows, 6, text_width, generator=g), negative_prompt=None,
                negative_prompt_embeds=torch.randn(rows, 6, text_width, generator=g),
                prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]][:rows]),
                negative_prompt_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0]] * rows),
                num_inference_steps=steps, use_resolution_binning=False, output_type="latent", **overrides)


def rel_err(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_accelerate_returns_the_pipelines_own_latents(kind, scheduler, backend):
    pipe = pipeline(kind, scheduler)
    call = pipeline_call(height=64, width=64)
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).images
    fast = de.accelerate(pipe, backend=backend)
    got = fast(generator=torch.Generator().manual_seed(3), **call).images
    assert got.shape == expected.shape == (2, 4, 8, 8)
    assert expected.abs().max() > 0.1
    assert rel_err(got, expected) <= 1e-4


def test_accelerate_alpha_1024_micro_conditions_and_a_non_square_latent():
    pipe = pipeline("alpha", "dpm", sample_size=128)  # micro-conditions from the 1024 config
    call = pipeline_call(height=96, width=128, steps=3)
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).images
    got = de.accelerate(pipe)(generator=torch.Generator().manual_seed(3), **call).images
    assert got.shape == expected.shape == (2, 4, 12, 16)
    assert rel_err(got, expected) <= 1e-4


def test_accelerate_refuses_what_it_does_not_run():
    fast = de.accelerate(pipeline())
    with pytest.raises(ValueError, match="timesteps: not supported by the accelerated pipeline"):
        fast(timesteps=[999, 500], **pipeline_call())
    with pytest.raises(ValueError, match="use_resolution_binning: no resolution bins for sample_size=8"):
        fast(**dict(pipeline_call(), use_resolution_binning=True))
    with pytest.raises(TypeError, match="accelerate: expected a diffusers DiTPipeline"):
        de.accelerate(object())


@pytest.mark.gpu
def test_gpu_bf16_graphs_equal_eager_and_track_the_fp32_reference():
    model = pixart(num_layers=4, attention_head_dim=72, num_attention_heads=4, caption_channels=64,
                   cross_attention_dim=288, sample_size=16).cuda()
    sched = S.DPMSolverPP(8)
    cond = {k: v.cuda() for k, v in conditioning(model).items()}
    z = noise(hw=(16, 16)).cuda()
    runs = {}
    for mode in (None, "step", "loop"):
        sampler = de.FastSampler(model, sched, cfg_scale=4.5, dtype=torch.bfloat16, cuda_graph=mode)
        runs[mode] = sampler(z, **cond)
        plan = next(iter(sampler._plans.values()))
        assert (plan.runner.graph is not None) if mode else plan.runner is None, mode
    assert torch.equal(runs["step"], runs[None]) and torch.equal(runs["loop"], runs[None])
    ref = de.sample(model, sched, z, cfg_scale=4.5, progress=False, **cond)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (runs[None] - ref).pow(2).sum())
    assert sqnr >= 30, f"bf16 fused PixArt sampler vs fp32 reference: SQNR {sqnr:.1f} dB (target 30 dB)"
