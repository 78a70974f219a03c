"""`ditengine.accelerate(StableDiffusion3Pipeline)`: the same latents as the pipeline called directly (fp32), SD3
with and without CFG and SD3.5 (dual attention, q/k norm), on the fused and the reference loop; a tiny offline
pipeline without text encoders (the embeddings given)."""
import pytest
import torch

import ditengine as de

from support.diffusers_models import POOLED, TEXT, call_pipeline, randomize, rel_err, text_embeddings, tiny_vae

diffusers = pytest.importorskip("diffusers")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=TEXT, pooled_projection_dim=POOLED,
            pos_embed_max_size=16)
SD35 = dict(qk_norm="rms_norm", dual_attention_layers=(0,))


def tiny_sd3_pipeline(seed: int = 0, dynamic_shift: bool = False, **overrides):
    transformer = randomize(diffusers.SD3Transformer2DModel(**{**TINY, **overrides}), seed, std=0.2).eval()
    vae = tiny_vae(seed, scaling_factor=1.5, latent_channels=overrides.get("in_channels", TINY["in_channels"]))
    shifting = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15) if dynamic_shift else {}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **shifting)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(B=1, seed=1, negative=True):
    return text_embeddings(B, seed, negative)


@pytest.mark.parametrize("flavour", ["sd3", "sd35"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_returns_the_pipelines_own_latents_with_cfg(flavour, backend):
    pipe = tiny_sd3_pipeline(**(SD35 if flavour == "sd35" else {}))
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, **embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    got = call_pipeline(de.accelerate(pipe, backend=backend), **kwargs)
    assert got.shape == want.shape == (2, 4, 8, 12)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(call_pipeline(pipe, **{**kwargs, "guidance_scale": 1.0}), want) > 1e-3  # the guidance mattered


def test_without_cfg_custom_sigmas_and_dynamic_shift():
    pipe = tiny_sd3_pipeline(seed=3, dynamic_shift=True)
    fast = de.accelerate(pipe)
    for kwargs in (dict(num_inference_steps=3, guidance_scale=1.0, **embeddings(negative=False)),
                   dict(sigmas=[1.0, 0.7, 0.3], guidance_scale=4.0, **embeddings()),
                   dict(num_inference_steps=2, guidance_scale=4.0, mu=0.8, num_images_per_prompt=1, **embeddings())):
        assert rel_err(call_pipeline(fast, **kwargs), call_pipeline(pipe, **kwargs)) <= 1e-4, kwargs


def test_decoded_images_match_and_refusals():
    pipe = tiny_sd3_pipeline(seed=1)
    kwargs = dict(num_inference_steps=2, **embeddings(), output_type="pt")
    want, got = call_pipeline(pipe, **kwargs), call_pipeline(de.accelerate(pipe), **kwargs)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-3
    fast = de.accelerate(pipe)
    for name, value in (("skip_guidance_layers", [0]), ("ip_adapter_image_embeds", [torch.zeros(1, 4)])):
        with pytest.raises(ValueError, match=f"{name}: not supported"):
            call_pipeline(fast, **{name: value}, **embeddings())
    with pytest.raises(ValueError, match="generator: pass one torch.Generator"):
        fast(generator=[torch.Generator()], output_type="latent", **embeddings())
    with pytest.raises(ValueError, match="have to be divisible by 2"):  # the pipeline's own check
        fast(height=9, width=12, output_type="latent", **embeddings())


def test_a_nan_guidance_scale_is_refused_not_run_unguided():
    """SD3 guides when guidance_scale > 1: a NaN would fail that test and run unguided, silently."""
    fast = de.accelerate(tiny_sd3_pipeline())
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number, got nan"):
        call_pipeline(fast, guidance_scale=float("nan"), **text_embeddings(negative=True))
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1, got 0"):
        call_pipeline(fast, num_inference_steps=0, **text_embeddings(negative=True))


@pytest.mark.parametrize("dynamic_shift", [False, True])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_img2img_returns_the_pipelines_own_latents(dynamic_shift, backend):
    from test_flux_pipeline import image

    pipe = diffusers.StableDiffusion3Img2ImgPipeline(**tiny_sd3_pipeline(dynamic_shift=dynamic_shift).components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image(), strength=0.7, num_inference_steps=5, **embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe, backend=backend), **kwargs), want) <= 1e-4
    t2i = call_pipeline(tiny_sd3_pipeline(dynamic_shift=dynamic_shift), num_inference_steps=5, **embeddings(B=2))
    assert rel_err(want, t2i) > 1e-2  # the image shows through


def test_img2img_refuses_a_missing_image_and_an_empty_schedule():
    from test_flux_pipeline import image

    fast = de.accelerate(diffusers.StableDiffusion3Img2ImgPipeline(**tiny_sd3_pipeline().components))
    with pytest.raises(ValueError, match="image: required"):
        call_pipeline(fast, **embeddings())
    with pytest.raises(ValueError, match="strength=0.0: with num_inference_steps=3 it leaves 0 steps"):
        call_pipeline(fast, image=image(), strength=0.0, num_inference_steps=3, **embeddings())


def test_callbacks_see_and_edit_what_the_pipeline_does():
    from test_flux_pipeline import assert_same_calls, recording_callback

    pipe = tiny_sd3_pipeline()
    kwargs = dict(num_inference_steps=3, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                  **embeddings(B=2))
    shapes = []

    def also_shapes(callback):
        def wrapped(p, i, t, kw):
            shapes.append(tuple(kw["prompt_embeds"].shape))
            return callback(p, i, t, kw)
        return wrapped

    theirs, seen_theirs = recording_callback(edit_step=1)
    want = call_pipeline(pipe, callback_on_step_end=also_shapes(theirs), **kwargs)
    ours, seen_ours = recording_callback(edit_step=1)
    assert rel_err(call_pipeline(de.accelerate(pipe), callback_on_step_end=also_shapes(ours), **kwargs), want) <= 1e-4
    assert_same_calls(seen_ours, seen_theirs)
    assert shapes[:3] == shapes[3:]  # the CFG batch's prompt embeddings, as the pipeline's loop holds them


@pytest.mark.parametrize("strength", [0.8, 1.0])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_inpaint_returns_the_pipelines_own_latents(strength, backend):
    from test_flux_pipeline import image, mask

    # diffusers' SD3 inpainting takes 16 latent channels (or 33 for an inpainting transformer)
    pipe = diffusers.StableDiffusion3InpaintPipeline(**tiny_sd3_pipeline(in_channels=16, out_channels=16).components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image(), mask_image=mask(), strength=strength, num_inference_steps=4, **embeddings(B=2))
    want = call_pipeline(pipe, **kwargs)
    assert rel_err(call_pipeline(de.accelerate(pipe, backend=backend), **kwargs), want) <= 1e-4
    assert rel_err(want, call_pipeline(pipe, **{**kwargs, "mask_image": 1 - mask()})) > 1e-2  # the mask matters


def test_inpaint_refuses_a_33_channel_transformer_by_name():
    pipe = diffusers.StableDiffusion3InpaintPipeline(**tiny_sd3_pipeline(in_channels=33, out_channels=16).components)
    with pytest.raises(ValueError, match="transformer: a 33-channel inpainting transformer"):
        call_pipeline(de.accelerate(pipe), image=torch.rand(1, 3, 8, 12), mask_image=torch.ones(1, 1, 8, 12),
                      **embeddings())
