"""`ditengine.accelerate(StableDiffusion3Pipeline)`: the same latents as the pipeline called directly (fp32), SD3
with and without CFG and SD3.5 (dual attention, q/k norm), on the fused and the reference loop; a tiny offline
pipeline without text encoders (the embeddings given)."""
import pytest
import torch

import ditengine as de

from diffusers_models import randomize

diffusers = pytest.importorskip("diffusers")
TEXT, POOLED, L = 24, 12, 7
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=TEXT, pooled_projection_dim=POOLED,
            pos_embed_max_size=16)
SD35 = dict(qk_norm="rms_norm", dual_attention_layers=(0,))


def tiny_sd3_pipeline(seed: int = 0, dynamic_shift: bool = False, **overrides):
    transformer = randomize(diffusers.SD3Transformer2DModel(**{**TINY, **overrides}), seed, std=0.2).eval()
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  shift_factor=0.06, scaling_factor=1.5).eval()
    shifting = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15) if dynamic_shift else {}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **shifting)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(B=1, seed=1, negative=True):
    g = torch.Generator().manual_seed(seed)
    out = dict(prompt_embeds=torch.randn(B, L, TEXT, generator=g), pooled_prompt_embeds=torch.randn(B, POOLED, generator=g))
    if negative:
        out.update(negative_prompt_embeds=torch.randn(B, L, TEXT, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(B, POOLED, generator=g))
    return out


def call(pipe, seed=0, **kwargs):
    kwargs.setdefault("output_type", "latent")
    return pipe(height=8, width=12, generator=torch.Generator().manual_seed(seed), **kwargs).images


def rel_err(got, expected):
    return float((got.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("flavour", ["sd3", "sd35"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_returns_the_pipelines_own_latents_with_cfg(flavour, backend):
    pipe = tiny_sd3_pipeline(**(SD35 if flavour == "sd35" else {}))
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, **embeddings(B=2))
    want = call(pipe, **kwargs)
    got = call(de.accelerate(pipe, backend=backend), **kwargs)
    assert got.shape == want.shape == (2, 4, 8, 12)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(call(pipe, **{**kwargs, "guidance_scale": 1.0}), want) > 1e-3  # the guidance mattered


def test_without_cfg_custom_sigmas_and_dynamic_shift():
    pipe = tiny_sd3_pipeline(seed=3, dynamic_shift=True)
    fast = de.accelerate(pipe)
    for kwargs in (dict(num_inference_steps=3, guidance_scale=1.0, **embeddings(negative=False)),
                   dict(sigmas=[1.0, 0.7, 0.3], guidance_scale=4.0, **embeddings()),
                   dict(num_inference_steps=2, guidance_scale=4.0, mu=0.8, num_images_per_prompt=1, **embeddings())):
        assert rel_err(call(fast, **kwargs), call(pipe, **kwargs)) <= 1e-4, kwargs


def test_decoded_images_match_and_refusals():
    pipe = tiny_sd3_pipeline(seed=1)
    kwargs = dict(num_inference_steps=2, **embeddings(), output_type="pt")
    want, got = call(pipe, **kwargs), call(de.accelerate(pipe), **kwargs)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-3
    fast = de.accelerate(pipe)
    for name, value in (("joint_attention_kwargs", {"scale": 0.5}), ("skip_guidance_layers", [0]),
                        ("ip_adapter_image_embeds", [torch.zeros(1, 4)])):
        with pytest.raises(ValueError, match=f"{name}: not supported"):
            call(fast, **{name: value}, **embeddings())
    with pytest.raises(ValueError, match="generator: pass one torch.Generator"):
        fast(generator=[torch.Generator()], output_type="latent", **embeddings())
    with pytest.raises(ValueError, match="have to be divisible by 2"):  # the pipeline's own check
        fast(height=9, width=12, output_type="latent", **embeddings())
