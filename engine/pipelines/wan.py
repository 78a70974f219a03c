"""Wan 2.1 / 2.2 (video): `WanPipeline` and `WanImageToVideoPipeline` accelerated (Wan 2.2 A14B's two experts
included), the reference loop's call of the model (as those pipelines call their transformer), and the family record
(diffusers and original Wan checkpoints)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import families
from ..cache import Stages
from ..checkpoints import from_diffusers
from ..experts import Expert
from ..fast import fused_denoiser
from ..fast.base import FusedDenoiser
from ..fast.wan import FastWan, check_inputs, frozen_input
from ..models import wan_checkpoints as wan
from ..models.wan import Wan, WanConfig, video_rope
from ..sampling import Forward, doubled
from .base import Accelerated, check_call, lora_scale, release_weights, step_callback


def wan_forward(model, spec: Wan, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named) -> Forward:
    """`model` (the spec `spec`, or diffusers' transformer with its weights) called as the Wan pipelines call it: the
    latents (with I2V's condition concatenated on the channels), t as the scheduler gives it, the negative prompt as
    the unconditional half, the image tokens the same for both halves; with `first_frame_latents` (TI2V's image mode)
    frame 0 replaced by the image and its tokens' timesteps 0, as the pipeline expands them."""
    cond = check_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    dtype = next(model.parameters()).dtype
    text = doubled(cond["prompt_embeds"], cond.get("negative_prompt_embeds"), use_cfg).to(dtype)
    image = cond["image_embeds"]
    image = None if image is None else doubled(image, image, use_cfg).to(dtype)
    condition = cond["condition_latents"]
    condition = None if condition is None else doubled(condition, condition, use_cfg).to(dtype)
    first = cond["first_frame_latents"]
    first = None if first is None else doubled(first, first, use_cfg)

    def forward(x_in, t, step):
        n = len(x_in)
        if condition is not None:
            x_in = torch.cat([x_in, condition[:n]], dim=1)
        if first is not None:  # TI2V's image mode: frame 0 is the image, its tokens at t = 0
            x_in = frozen_input(x_in, first[:n])
            (f, h, w), (_, ph, pw) = x_in.shape[2:], spec.config.patch_size
            moving = torch.ones(f, h // ph, w // pw, device=t.device, dtype=t.dtype)
            moving[0] = 0
            t = t[:, None] * moving.flatten()  # (n, tokens)
        kw = dict(timestep=t, encoder_hidden_states=text[:n],
                  encoder_hidden_states_image=None if image is None else image[:n])
        if cache is not None:
            return cache(wan_stages(spec, x_in.to(dtype), **kw), step)
        return model(x_in.to(dtype), **kw, return_dict=False)[0]

    return forward


def wan_stages(spec: Wan, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image) -> Stages:
    """`Wan.forward` cut for a step cache."""
    x, grid = spec.embed(hidden_states)  # (B, N, D)
    rope = video_rope(grid, spec.config, hidden_states.device)
    temb, m, text, image = spec.conditioning(timestep, encoder_hidden_states, encoder_hidden_states_image)
    return Stages(x, [functools.partial(b, context=text, mod=m, rope=rope, image=image) for b in spec.blocks],
                  lambda x: spec.unembed(x, temb, grid), [[b.attn1, b.attn2, b.ffn] for b in spec.blocks], spec)


def timestep_signal(spec: Wan, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TeaCache's signals in fp32: e, the time embedding (S, D), and e0, its projection (S, 6 D)."""
    emb = spec.condition_embedder
    te, proj = emb.time_embedder, emb.time_proj
    fp32 = lambda layer: (layer.weight.detach().float().cpu(), layer.bias.detach().float().cpu())  # noqa: E731
    e = FusedDenoiser.embed_sinusoidal((*fp32(te.linear_1), *fp32(te.linear_2)), timesteps.float().cpu())
    return e, F.linear(F.silu(e), *fp32(proj))


class AcceleratedWanPipeline(Accelerated):
    """Called like `WanPipeline` (text to video: Wan 2.1, Wan 2.2 A14B and TI2V-5B) or `WanImageToVideoPipeline`
    (Wan 2.1 I2V with CLIP image tokens, Wan 2.2 A14B I2V, TI2V-5B's image mode), returning what they return; the
    denoising loop runs in ditengine.

    The prompts go through the pipeline's own `encode_prompt` (umT5, or the `prompt_embeds` you pass: a pipeline
    built with `tokenizer=None, text_encoder=None` works with embeddings), the image through its `encode_image` and
    VAE (`prepare_latents`: the frame mask and the encoded first frame, concatenated to the latents at every step),
    the latents are drawn as it draws them, and the video is decoded and post-processed by its VAE and video
    processor. Wan 2.2 A14B's `transformer_2` runs the steps below `boundary_ratio * num_train_timesteps` with
    `guidance_scale_2`, inside the same loop (a static switch: `ditengine.experts.Expert`). In fp32 the latents equal
    the pipeline's within 1e-4 relative.

    Wan 2.2 TI2V-5B (`expand_timesteps`): text to video as Wan 2.1; its image mode holds the encoded image as the
    first latent frame, that frame's tokens at t = 0 (`first_frame_latents`). Not served (a ValueError naming it):
    `last_image` (first-last-frame models); call the pipeline itself for it.
    """

    def __init__(self, pipe, **options):
        if pipe.transformer is None:
            raise ValueError("pipe.transformer: None; the accelerated pipeline runs the high-noise transformer (and "
                             "transformer_2 below the boundary)")
        super().__init__(pipe, **options)
        self.model_2 = self.fast_2 = None
        second = getattr(pipe, "transformer_2", None)
        if second is not None and pipe.config.boundary_ratio is not None:
            self.model_2 = from_diffusers(second, peft_base=True).to(self.device).eval()
            if self.backend == "reference":
                self.model_2 = self.model_2.to(self.dtype)
            else:
                self.fast_2 = fused_denoiser(self.model_2, self.dtype, quantize=self.quantize)
            if options.get("release_transformer"):
                release_weights(second, self.model_2)

    def expert(self, guidance_scale_2: float | None) -> Expert | None:
        if self.model_2 is None:
            return None
        boundary = self.pipe.config.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
        return Expert(self.model_2, boundary, guidance_scale_2)

    @torch.no_grad()
    def __call__(self, image=None, prompt=None, negative_prompt=None, height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 guidance_scale_2: float | None = None, num_videos_per_prompt: int | None = 1, generator=None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 last_image=None, output_type: str | None = "np", return_dict: bool = True,
                 attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

        pipe = self.pipe
        i2v = type(pipe).__name__ == "WanImageToVideoPipeline"
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        if i2v:
            if last_image is not None:
                raise ValueError("last_image: first-last-frame video is not served by the accelerated pipeline; call "
                                 "the pipeline itself for it")
            pipe.check_inputs(prompt, negative_prompt, image, height, width, prompt_embeds, negative_prompt_embeds,
                              image_embeds, tensor_inputs, guidance_scale_2)
        else:
            if image is not None or image_embeds is not None:
                raise ValueError("image: WanPipeline is text to video; use WanImageToVideoPipeline for an image")
            pipe.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                              tensor_inputs, guidance_scale_2)
        if isinstance(generator, list):
            raise ValueError("generator: pass one torch.Generator (a list per video is not supported)")
        temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if num_frames % temporal != 1:  # the pipeline's own rounding (it logs a warning)
            num_frames = num_frames // temporal * temporal + 1
        num_frames = max(num_frames, 1)
        _, ph, pw = pipe.transformer.config.patch_size
        height, width = height // (spatial * ph) * spatial * ph, width // (spatial * pw) * spatial * pw
        if pipe.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        guided = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guided,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=self.device)
        rows = batch * num_videos_per_prompt
        conditioning = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds if guided
                            else None)
        if i2v:
            if pipe.transformer.config.image_dim is not None:  # Wan 2.1 I2V: CLIP's image tokens
                if image_embeds is None:
                    image_embeds = pipe.encode_image(image, self.device)
                conditioning["image_embeds"] = image_embeds.repeat(batch, 1, 1)
            frames = pipe.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
            prepared = pipe.prepare_latents(frames, rows, pipe.vae.config.z_dim, height, width, num_frames,
                                            torch.float32, self.device, generator, latents)
            noise, condition = prepared[:2]
            # TI2V's image mode holds the encoded image as frame 0; Wan 2.1 / 2.2 I2V concatenate it as channels.
            conditioning["first_frame_latents" if pipe.config.expand_timesteps else "condition_latents"] = condition
        else:
            noise = pipe.prepare_latents(rows, pipe.transformer.config.in_channels, height, width, num_frames,
                                         torch.float32, self.device, generator, latents)
        callback = step_callback(pipe, callback_on_step_end, tensor_inputs,
                                 {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds},
                                 lambda x: x, lambda latents: latents.float())
        out = self.denoise(noise, num_inference_steps, guidance_scale if guided else 1.0, generator, {},
                           lora_scale=lora_scale(attention_kwargs, "attention_kwargs"), callback=callback,
                           expert=self.expert(guidance_scale_2), expert_denoiser=self.fast_2, **conditioning)
        if i2v and pipe.config.expand_timesteps:  # the pipeline's last mix: frame 0 is the image
            out = frozen_input(out, conditioning["first_frame_latents"])
        if output_type == "latent":
            video = out
        else:
            vae = pipe.vae
            mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
            latents = out.to(vae.dtype) * std.to(out.device, vae.dtype) + mean.to(out.device, vae.dtype)
            video = pipe.video_processor.postprocess_video(vae.decode(latents, return_dict=False)[0],
                                                           output_type=output_type)
        pipe.maybe_free_model_hooks()
        return WanPipelineOutput(frames=video) if return_dict else (video,)


families.register(families.Family(
    name="wan", spec=Wan, config=WanConfig, fast=FastWan, forward=wan_forward, reference_cache=True,
    channels=lambda cfg: cfg.out_channels, depth=lambda model: len(model.blocks),
    diffusers_class="WanTransformer3DModel", from_diffusers=wan.from_diffusers, recognises=wan.is_wan_state_dict,
    load=families.config_loader(wan.load_state_dict),
    pipelines={"WanPipeline": AcceleratedWanPipeline, "WanImageToVideoPipeline": AcceleratedWanPipeline},
    bench=(lambda name: name.lower().startswith("wan"), "ditengine.bench.wan:wan_setup"),
    bench_defaults={"cfg_scale": 5.0},  # the pipelines' default guidance
    timestep_signal=timestep_signal))
