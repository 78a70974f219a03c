"""Wan (video) through the engine: the fused denoiser against the reference spec (text to video, image to video with
its image K/V and channel condition, TI2V's first frame at t = 0), in every graph mode, with a second expert and
TeaCache; `accelerate` against the diffusers pipelines' own latents; the kernel forms the denoiser adds (the
across-heads norm, the 3-D RoPE on odd grids); the bad inputs of a video family."""
import pytest
import torch
import torch.nn.functional as F

import ditengine as de
from ditengine.kernels import gqa_attention
from ditengine.models.wan import Wan, WanConfig

from support.backends import cpu_backends
from support.tolerance import assert_fp32_run_within_tolerance, assert_within_tolerance

S = de.schedulers
# Head dim 16 (the attention kernels' smallest), two heads, two layers; 3 x 4 x 6 latents: 3 x 2 x 3 = 18 tokens.
SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=24, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
I2V = dict(in_channels=9, image_dim=20, added_kv_proj_dim=32)  # 4 latent + 5 condition channels
B, L, IMAGE_TOKENS = 2, 9, 5


def wan(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Wan(WanConfig(**{**SMALL, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter live: norms near 1, the rest small
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
    return model


def noise(batch=B, shape=(3, 4, 6), seed=2):
    return torch.randn(batch, 4, *shape, generator=torch.Generator().manual_seed(seed))


def conditioning(model, batch=B, seed=1, shape=(3, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    cond = dict(prompt_embeds=torch.randn(batch, L, cfg.text_dim, generator=g),
                negative_prompt_embeds=torch.randn(batch, L, cfg.text_dim, generator=g))
    if cfg.image_dim is not None:
        cond["image_embeds"] = torch.randn(batch, IMAGE_TOKENS, cfg.image_dim, generator=g)
    if cfg.in_channels != cfg.out_channels:
        cond["condition_latents"] = torch.randn(batch, cfg.in_channels - cfg.out_channels, *shape, generator=g)
    return cond


def schedule(steps=4):
    return S.FlowMatchEuler(steps, shift=3.0)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("make", [schedule, lambda: S.DPMSolverPP(4, use_flow_sigmas=True, flow_shift=3.0,
                                                                  prediction_type="flow_prediction")],
                         ids=["flow-euler", "dpm++-flow"])
def test_fast_sampler_matches_the_reference_in_fp32(kind, make):
    model, sched = wan(**(I2V if kind == "i2v" else {})), make()
    cond, z = conditioning(model), noise()
    got = de.FastSampler(model, sched, cfg_scale=5.0, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, z, cfg_scale=5.0, progress=False, **cond),
                                     model, f"Wan {kind} fused sampler")


@pytest.mark.parametrize("mode", [None, "step", "loop"])
def test_graph_modes_and_the_bf16_forward(mode):
    """Every graph mode runs the same loop (on a CPU the buffers run eagerly); the bf16 forward within the rule."""
    model = wan(**I2V)
    cond, z = conditioning(model), noise()
    got = de.FastSampler(model, schedule(), cfg_scale=5.0, dtype=torch.float32, cuda_graph=mode)(z, **cond)
    want = de.FastSampler(model, schedule(), cfg_scale=5.0, dtype=torch.float32, cuda_graph=None)(z, **cond)
    assert torch.equal(got, want)
    from ditengine.fast.wan import FastWan

    fast = FastWan(model, torch.bfloat16)
    inputs = fast.inputs(model, z, False, prompt_embeds=cond["prompt_embeds"], image_embeds=cond["image_embeds"],
                         condition_latents=cond["condition_latents"])
    ctx = fast.context_buffers(B, tuple(z.shape[1:]), inputs)
    fast.write_context(ctx, inputs, False)
    t = torch.tensor([700.0])
    x_in = torch.cat([z, cond["condition_latents"]], dim=1)
    call = dict(encoder_hidden_states=cond["prompt_embeds"], encoder_hidden_states_image=cond["image_embeds"])
    with torch.no_grad():
        got = fast.forward(z.bfloat16(), tuple(m[0] for m in fast.modulation(t, ctx)), ctx).float()
        ref32 = model(x_in, t.expand(B), **call)
        ref_lp = wan(**I2V).bfloat16()(x_in.bfloat16(), t.expand(B), **{k: v.bfloat16() for k, v in call.items()})
    assert ref32.abs().max() > 0.5
    assert_within_tolerance(got, ref32, ref_lp.float(), 1e-2, "Wan bf16 fused forward")


def test_the_image_and_the_condition_reach_the_fast_path():
    model = wan(**I2V)
    cond, z = conditioning(model), noise()
    sampler = de.FastSampler(model, schedule(), cfg_scale=5.0, dtype=torch.float32, cuda_graph=None)
    base = sampler(z, **cond)
    for name in ("image_embeds", "condition_latents"):
        other = sampler(z, **{**cond, name: torch.randn_like(cond[name])})
        assert (other - base).abs().max() > 1e-3, name


def test_the_second_expert_runs_the_low_noise_steps_with_its_own_scale():
    """Wan 2.2 A14B: `transformer_2` below the boundary, `guidance_scale_2`, in both loops and every graph mode."""
    model, second = wan(), wan(seed=5)
    cond, z, sched = conditioning(model), noise(), S.FlowMatchEuler(6, shift=3.0)
    expert = de.Expert(second, boundary=600.0, cfg_scale=2.5)
    low = expert.steps(sched.timesteps)
    assert any(low) and not all(low)
    want = de.sample(model, sched, z, cfg_scale=5.0, progress=False, expert=expert, **cond)
    for mode in (None, "step", "loop"):
        got = de.FastSampler(model, sched, cfg_scale=5.0, dtype=torch.float32, cuda_graph=mode, expert=expert)(
            z, **cond)
        assert_fp32_run_within_tolerance(got, lambda m: want, model, f"Wan experts {mode}")
    alone = de.sample(model, sched, z, cfg_scale=5.0, progress=False, **cond)
    assert (alone - want).abs().max() > 1e-3  # the expert did run
    with pytest.raises(ValueError, match="expert: expected a model of the same config"):
        de.FastSampler(model, sched, expert=de.Expert(wan(num_layers=1), 500.0))
    with pytest.raises(ValueError, match="expert: not combined"):
        de.FastSampler(model, sched, expert=expert, cache=de.cache.StaticCache(2, 1, 1))


@pytest.mark.parametrize("ret", [True, False])
def test_teacache_decides_from_the_timesteps_alone_and_both_loops_follow_it(ret):
    """The tiny model's timestep signal moves far more per step (relative L1 0.5 to 1.3) than the published
    polynomials were fitted on (below about 0.1), so the identity polynomial stands in for them here."""
    model, sched = wan(), S.FlowMatchEuler(12, shift=3.0)
    cond, z = conditioning(model), noise()
    cache = de.cache.TeaCache(1.0, use_ret_steps=ret, coefficients=(1.0, 0.0))
    decided = de.cache.resolve(cache, model, sched.timesteps).full
    assert decided[0] and (decided[-1] or ret) and not all(decided)
    if ret:
        assert all(decided[:5])
    stats, ref_stats = {}, {}
    want = de.sample(model, sched, z, cfg_scale=5.0, progress=False, cache=cache, stats=ref_stats, **cond)
    got = de.sample(model, sched, z, cfg_scale=5.0, progress=False, cache=cache, stats=stats, backend="fused",
                    **cond)
    assert stats["cached_steps"] == ref_stats["cached_steps"] == [i for i, f in enumerate(decided) if not f]
    assert_fp32_run_within_tolerance(got, lambda m: want, model, "Wan TeaCache")


def test_teacache_follows_the_published_rule():
    """The accumulated, rescaled relative L1 change of the signal against the threshold, checked on a hand-made
    signal whose per-step changes are known: x = 0.1 each step, with the polynomial p(x) = x."""
    signal = torch.tensor([1.1 ** i for i in range(8)])[:, None].double()
    policy = de.cache.TeaCache(0.25, coefficients=(1.0, 0.0), use_ret_steps=False)
    # steps 1..6 add 1/11 relative change each (|1.1^i - 1.1^(i-1)| / 1.1^(i-1) = 0.1): full when the sum >= 0.25
    assert policy.decide(signal, signal).full == (True, False, False, True, False, False, True, True)
    with pytest.raises(ValueError, match="TeaCache: model='Wan9'"):
        de.cache.TeaCache(model="Wan9")
    with pytest.raises(ValueError, match="TeaCache needs a timestep signal"):
        import test_pixart

        de.FastSampler(test_pixart.pixart(), S.DPMSolverPP(4), cache=de.cache.TeaCache())


def test_bad_inputs_are_named():
    model = wan(**I2V)
    cond, z = conditioning(model), noise()
    sampler = de.FastSampler(model, schedule(), cfg_scale=5.0, dtype=torch.float32, cuda_graph=None)
    cases = [
        (dict(noise=z[:, :, :, :3]), ValueError, r"^noise: expected video latents \(B, 4, F, H, W\)"),
        (dict(noise=z[0]), ValueError, "^noise: "),
        (dict(prompt_embeds=cond["prompt_embeds"][..., :5]), ValueError, r"^prompt_embeds: expected \(2, L, 24\)"),
        (dict(negative_prompt_embeds=None), ValueError, "^negative_prompt_embeds: required with guidance"),
        (dict(negative_prompt_embeds=cond["negative_prompt_embeds"][:, :4]), ValueError,
         "^negative_prompt_embeds: 4 tokens"),
        (dict(image_embeds=None), ValueError, "^image_embeds: this image-to-video Wan needs"),
        (dict(condition_latents=cond["condition_latents"][:, :2]), ValueError, "^condition_latents: this Wan takes 9"),
    ]
    for edit, exc, match in cases:
        call = {**cond, "noise": z, **edit}
        with pytest.raises(exc, match=match):
            sampler(call.pop("noise"), **call)
    t2v = de.FastSampler(wan(), schedule(), cfg_scale=5.0, dtype=torch.float32, cuda_graph=None)
    with pytest.raises(ValueError, match="^image_embeds: this Wan has no image embedder"):
        t2v(z, **conditioning(wan()), image_embeds=cond["image_embeds"])


# -- the diffusers pipelines ---------------------------------------------------------------------------------------
def diffusers_wan(seed=0, **overrides):
    diffusers = pytest.importorskip("diffusers")
    from ditengine.models.wan import WanConfig

    cfg = WanConfig(**{**SMALL, **overrides})
    transformer = diffusers.WanTransformer3DModel(**cfg.to_diffusers()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
    return transformer


def tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                      latents_std=[1.5, 0.8, 1.0, 2.0]).eval()


def wan_pipeline(kind="t2v", experts=False, expand_timesteps=False, **transformer):
    diffusers = pytest.importorskip("diffusers")
    # I2V: the latents, then the 4-frame mask and the encoded image (4 + 4 channels)
    overrides = {**(dict(I2V, in_channels=12) if kind == "i2v" else {}), **transformer}
    parts = dict(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                 transformer=diffusers_wan(**overrides))
    if experts:
        parts.update(transformer_2=diffusers_wan(seed=7, **overrides), boundary_ratio=0.9)  # t 1000 | 858, 602, 9
    if expand_timesteps:
        parts["expand_timesteps"] = True
    if kind == "i2v":
        encoder = processor = None
        if overrides.get("image_dim") is not None:  # Wan 2.1 I2V: a tiny CLIP vision tower (Wan 2.2's has none)
            transformers = pytest.importorskip("transformers")
            torch.manual_seed(0)
            encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
                hidden_size=4, num_hidden_layers=2, num_attention_heads=2, image_size=32, intermediate_size=16,
                patch_size=8)).eval()
            processor = transformers.CLIPImageProcessor(crop_size=32, size=32)
        pipe = diffusers.WanImageToVideoPipeline(image_encoder=encoder, image_processor=processor, **parts)
    else:
        pipe = diffusers.WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(rows=1, steps=4, tokens=L, **overrides):
    g = torch.Generator().manual_seed(4)
    return dict(prompt_embeds=torch.randn(rows, tokens, 24, generator=g), negative_prompt=None,
                negative_prompt_embeds=torch.randn(rows, tokens, 24, generator=g), num_inference_steps=steps,
                height=32, width=48, num_frames=9, **{"output_type": "latent", **overrides})


def rel_err(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("kind, experts", [("t2v", False), ("t2v", True), ("i2v", False), ("i2v", True)],
                         ids=["wan2.1-t2v", "wan2.2-a14b-t2v", "wan2.1-i2v", "wan2.2-a14b-i2v"])
def test_accelerate_returns_the_pipelines_own_latents(kind, experts, backend):
    # Wan 2.2 A14B's I2V experts take no CLIP tokens: the image reaches them through the condition channels only.
    pipe = wan_pipeline(kind, experts, **({"image_dim": None, "added_kv_proj_dim": None} if experts else
                                          {"image_dim": 4} if kind == "i2v" else {}))
    # diffusers' attention splits the image tokens off the text by the text's 512 (the pipelines' padding)
    call = pipeline_call(guidance_scale_2=2.0 if experts else None, tokens=512 if kind == "i2v" else L)
    if kind == "i2v":
        call["image"] = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(9))
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    got = de.accelerate(pipe, backend=backend)(generator=torch.Generator().manual_seed(3), **call).frames
    assert got.shape == expected.shape == (1, 4, 3, 4, 6)
    assert expected.abs().max() > 0.1
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_accelerate_ti2v_expanded_timesteps(kind, backend):
    """Wan 2.2 TI2V-5B (`expand_timesteps`): per-token timesteps, all equal in text to video; in image to video the
    image is frame 0, its tokens at t = 0."""
    pipe = wan_pipeline(kind, expand_timesteps=True, **({"in_channels": 4, "image_dim": None,
                                                          "added_kv_proj_dim": None} if kind == "i2v" else {}))
    call = pipeline_call()
    if kind == "i2v":
        call["image"] = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(9))
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    got = de.accelerate(pipe, backend=backend)(generator=torch.Generator().manual_seed(3), **call).frames
    assert got.shape == expected.shape == (1, 4, 3, 4, 6)
    assert rel_err(got, expected) <= 1e-4


def test_accelerate_releases_both_experts_weights():
    pipe = wan_pipeline(experts=True)
    call = pipeline_call(guidance_scale_2=2.0)
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    got = de.accelerate(pipe, release_transformer=True)(generator=torch.Generator().manual_seed(3), **call).frames
    assert rel_err(got, expected) <= 1e-4
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert all(p.is_meta for p in transformer.parameters())


def test_accelerate_decodes_the_video_like_the_pipeline():
    pipe = wan_pipeline()
    call = pipeline_call(steps=2, output_type="pt")
    expected = pipe(generator=torch.Generator().manual_seed(3), **call).frames
    got = de.accelerate(pipe)(generator=torch.Generator().manual_seed(3), **call).frames
    assert got.shape == expected.shape and rel_err(got, expected) <= 1e-4


def test_accelerate_refuses_what_it_does_not_run():
    fast = de.accelerate(wan_pipeline("i2v", image_dim=4))
    image = torch.rand(1, 3, 32, 48)
    with pytest.raises(ValueError, match="last_image: first-last-frame video is not served"):
        fast(image=image, last_image=image, **pipeline_call())
    with pytest.raises(ValueError, match="image: WanPipeline is text to video"):
        de.accelerate(wan_pipeline())(image=image, **pipeline_call())


def ti2v_conditioning(model, batch=B):
    cond = conditioning(model, batch)
    g = torch.Generator().manual_seed(11)
    return cond | {"first_frame_latents": torch.randn(batch, 4, 1, 4, 6, generator=g)}


@pytest.mark.parametrize("mode", [None, "loop"])
def test_ti2v_image_mode_holds_the_first_frame_at_t_0(mode):
    """Wan 2.2 TI2V-5B's image mode: frame 0 is the image at every step, its tokens at t = 0 (per-token modulation),
    in the fused loop as in the reference (whose spec takes per-token timesteps, as diffusers' does)."""
    model, sched = wan(), schedule()
    cond, z = ti2v_conditioning(model), noise()
    got = de.FastSampler(model, sched, cfg_scale=5.0, dtype=torch.float32, cuda_graph=mode)(z, **cond)
    assert_fp32_run_within_tolerance(got, lambda m: de.sample(m, sched, z, cfg_scale=5.0, progress=False, **cond),
                                     model, "Wan TI2V image mode")
    plain = de.FastSampler(model, sched, cfg_scale=5.0, dtype=torch.float32, cuda_graph=mode)(z, **conditioning(model))
    assert (plain[:, :, 1:] - got[:, :, 1:]).abs().max() > 1e-3  # the held frame reaches the others
    cache = de.cache.StaticCache(2, 1, 1, reuse="blocks")
    cached = de.FastSampler(model, S.FlowMatchEuler(6, shift=3.0), cfg_scale=5.0, dtype=torch.float32,
                            cuda_graph=mode, cache=cache)(z, **cond)
    ref = de.sample(model, S.FlowMatchEuler(6, shift=3.0), z, cfg_scale=5.0, progress=False, cache=cache, **cond)
    assert_fp32_run_within_tolerance(cached, lambda m: ref, model, "Wan TI2V cached")


# -- the kernel forms the fused denoiser adds ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", cpu_backends("adaln_modulate"))
def test_across_heads_norm_of_a_column_slice(backend, dtype):
    """q's RMSNorm over all heads, read in place from the fused q|k|v output (a strided column slice), against
    torch's RMSNorm; a NaN stays in its token's row."""
    from ditengine.fast.wan import rms_across_heads

    g = torch.Generator().manual_seed(5)
    qkv = (torch.randn(2, 9, 3, 96, generator=g) * 3 + 0.5).to(dtype)
    weight = torch.rand(96, generator=g).to(dtype) + 0.5
    x = qkv[:, :, 0]
    got = rms_across_heads(x, weight, 1e-6, backend)
    ref32 = F.rms_norm(x.float(), (96,), weight.float(), 1e-6)
    assert_within_tolerance(got, ref32, F.rms_norm(x, (96,), weight, 1e-6), 1e-5, "across-heads RMSNorm")
    qkv[1, 4, 0, 7] = float("nan")
    poisoned = rms_across_heads(qkv[:, :, 0], weight, 1e-6, backend)
    row = torch.zeros(2, 9, dtype=torch.bool)
    row[1, 4] = True
    assert torch.isnan(poisoned[row]).all() and torch.equal(poisoned[~row], got[~row])


@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 3, 1)], ids=["3x5x7", "1x3x1"])
@pytest.mark.parametrize("backend", cpu_backends("gqa_attention"))
def test_3d_rope_attention_on_odd_grids(backend, grid):
    """The 3-D RoPE tables of an odd patch grid in the attention's prologue, against the spec's rotation then
    SDPA, at head dims 16 (axes 8 / 4 / 4) and 32 (12 / 10 / 10)."""
    from ditengine.models.flux import apply_rope
    from ditengine.models.wan import sdpa, video_rope

    for head_dim in (16, 32):
        cfg = WanConfig(**{**SMALL, "attention_head_dim": head_dim})
        rope = video_rope(grid, cfg)
        T = grid[0] * grid[1] * grid[2]
        g = torch.Generator().manual_seed(head_dim)
        q, k, v = (torch.randn(2, T, 2, head_dim, generator=g) for _ in range(3))
        got = gqa_attention(q, k, v, rope=rope, rope_interleaved=True, backend=backend)
        want = sdpa(apply_rope(q, rope), apply_rope(k, rope), v).view(2, T, 2, head_dim)
        assert_within_tolerance(got, want, want, 1e-5, f"3-D RoPE attention {grid} Dh {head_dim}")
