"""SD3 / SD3.5: `StableDiffusion3Pipeline` accelerated, the reference loop's call of the model (t = 1000 sigma in
fp32), and the family record (diffusers and SAI checkpoints)."""
from __future__ import annotations

import functools

import torch

from .. import families
from ..cache import Stages
from ..fast.sd3 import FastSD3, check_inputs
from ..models import sd3_checkpoints as sd3
from ..models.sd3 import SD3, SD3Config
from ..sampling import Forward, doubled
from .base import Accelerated, check_call, lora_scale, refuse_unsupported


def sd3_forward(model, spec: SD3, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named) -> Forward:
    """`model` (the reference spec `spec`, or diffusers' transformer with its weights) called as
    StableDiffusion3Pipeline calls it: t = 1000 sigma in fp32, the negative prompt as the unconditional half."""
    cond = check_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    dtype = next(model.parameters()).dtype
    text = doubled(cond["prompt_embeds"], cond.get("negative_prompt_embeds"), use_cfg).to(dtype)
    pooled = doubled(cond["pooled_prompt_embeds"], cond.get("negative_pooled_prompt_embeds"), use_cfg).to(dtype)

    def forward(x_in, t, step):
        n = len(x_in)
        if cache is not None:
            return cache(sd3_stages(spec, x_in, text[:n], pooled[:n], t), step)
        return model(x_in, encoder_hidden_states=text[:n], pooled_projections=pooled[:n], timestep=t,
                     return_dict=False)[0]

    return forward

def sd3_stages(spec: SD3, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> Stages:
    """`SD3.forward` cut for a step cache: the stream is [image; text] (B, N+L, D), as the fused denoiser keeps it
    (the last block leaves the text rows as they are)."""
    p = spec.config.patch_size
    grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    x = spec.embed(hidden_states)  # (B, N, D)
    temb = spec.timestep_conditioning(timestep, pooled_projections)  # (B, D)
    c = spec.context(encoder_hidden_states)  # (B, L, D)
    N = x.shape[1]

    def block(i, s):
        x, c = spec.block(i, s[:, :N], s[:, N:], temb)
        return torch.cat([x, s[:, N:] if c is None else c], dim=1)

    blocks = spec.transformer_blocks
    return Stages(torch.cat([x, c], dim=1), [functools.partial(block, i) for i in range(len(blocks))],
                  lambda s: spec.unembed(s[:, :N], temb, grid),
                  [[m for m in (b.attn, b.ff, b.ff_context, b.attn2) if m is not None] for b in blocks], spec)


class AcceleratedSD3Pipeline(Accelerated):
    """Called like `StableDiffusion3Pipeline` (SD3 and SD3.5), returning what it returns; the denoising loop runs
    in ditengine.

    The prompts go through the pipeline's own `encode_prompt` (CLIP-L, CLIP-G and T5, or the `prompt_embeds`,
    `pooled_prompt_embeds` and negative ones you pass: a pipeline without text encoders works with embeddings),
    once per call; the latents are drawn as the pipeline draws them, the scheduler's shift (and mu, when it
    shifts dynamically) applied as it does, and the image decoded by its VAE. `guidance_scale > 1` runs the CFG
    batch. In fp32 the latents equal the pipeline's within 1e-4 relative. LoRA adapters on the transformer are served
    live (`docs/lora.md`), with `joint_attention_kwargs={"scale": s}`. IP-Adapter inputs, other
    `joint_attention_kwargs`, skip-layer guidance, step callbacks and a list of generators raise a ValueError.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 7.0,
                 negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, output_type: str | None = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 256, skip_guidance_layers=None, skip_layer_guidance_scale: float = 2.8,
                 skip_layer_guidance_stop: float = 0.2, skip_layer_guidance_start: float = 0.01,
                 mu: float | None = None):
        check_call(num_inference_steps, guidance_scale)
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            StableDiffusion3PipelineOutput, calculate_shift)

        pipe = self.pipe
        refuse_unsupported(generator, ip_adapter_image=ip_adapter_image,
                            ip_adapter_image_embeds=ip_adapter_image_embeds,
                            skip_guidance_layers=skip_guidance_layers, callback_on_step_end=callback_on_step_end)
        scale = lora_scale(joint_attention_kwargs)
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        use_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=use_cfg,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=self.device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=scale if joint_attention_kwargs else None)
        named = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
        if use_cfg:
            named.update(negative_prompt_embeds=negative_prompt_embeds,
                         negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        rows = batch * num_images_per_prompt
        noise = pipe.prepare_latents(rows, pipe.transformer.config.in_channels, height, width, prompt_embeds.dtype,
                                     self.device, generator, latents)
        overrides = {} if sigmas is None else {"sigmas": tuple(float(v) for v in sigmas)}
        config = pipe.scheduler.config
        if mu is None and config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            mu = calculate_shift((noise.shape[2] // patch) * (noise.shape[3] // patch),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        if mu is not None:
            overrides["mu"] = mu
        steps = num_inference_steps if sigmas is None else len(sigmas)
        latents = self.denoise(noise, steps, guidance_scale if use_cfg else 1.0, generator, overrides,
                               lora_scale=scale, **named).to(prompt_embeds.dtype)
        if output_type == "latent":
            image = latents
        else:
            decoded = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(decoded, return_dict=False)[0],
                                                     output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


families.register(families.Family(
    name="sd3", spec=SD3, config=SD3Config, fast=FastSD3, forward=sd3_forward, reference_cache=True,
    channels=lambda cfg: cfg.in_channels, depth=lambda model: model.config.num_layers,
    diffusers_class="SD3Transformer2DModel", from_diffusers=sd3.from_diffusers, recognises=sd3.is_sd3_state_dict,
    load=families.config_loader(sd3.load_state_dict),
    pipelines={"StableDiffusion3Pipeline": AcceleratedSD3Pipeline},
    bench=(lambda name: name.upper().startswith("SD3"), "ditengine.bench.sd3:sd3_setup")))
