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
from .base import Accelerated, check_call, check_mask, inpaint_blend, lora_scale, refuse_unsupported, step_callback


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
    live (`docs/lora.md`), with `joint_attention_kwargs={"scale": s}`; `callback_on_step_end` gets the step index,
    timestep and the tensors it asks for, and latents it returns are taken into the loop (the whole-loop graph
    falls back to per-step graphs). IP-Adapter inputs, other `joint_attention_kwargs`, skip-layer guidance and a
    list of generators raise a ValueError.
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
        pipe = self.pipe
        refuse_unsupported(generator, ip_adapter_image=ip_adapter_image,
                            ip_adapter_image_embeds=ip_adapter_image_embeds, skip_guidance_layers=skip_guidance_layers)
        scale = lora_scale(joint_attention_kwargs)
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, cfg = self._prompts(prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2,
                                         negative_prompt_3, guidance_scale, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                         clip_skip, max_sequence_length, scale if joint_attention_kwargs else None)
        dtype = named["prompt_embeds"].dtype
        noise = pipe.prepare_latents(rows, pipe.transformer.config.in_channels, height, width, dtype, self.device,
                                     generator, latents)
        overrides = self._schedule(sigmas, mu, height, width)
        steps = num_inference_steps if sigmas is None else len(sigmas)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, steps,
                                  guidance_scale, joint_attention_kwargs)
        out = self.denoise(noise, steps, cfg, generator, overrides, lora_scale=scale, callback=callback, **named)
        return self._finish(out.to(dtype), output_type, return_dict)

    # -- what the SD3 pipelines share around the loop -------------------------------------------------------------
    def _prompts(self, prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2, negative_prompt_3,
                 guidance_scale, num_images_per_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                 negative_pooled_prompt_embeds, clip_skip, max_sequence_length, text_lora_scale):
        """The prompts through the pipeline's own `encode_prompt`: (the loop's named conditioning, the rows it
        samples, its CFG scale: 1 without guidance)."""
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        use_cfg = guidance_scale > 1
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = \
            self.pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=use_cfg, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=self.device, clip_skip=clip_skip,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=text_lora_scale)
        named = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
        if use_cfg:
            named.update(negative_prompt_embeds=negative_prompt_embeds,
                         negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        return named, batch * num_images_per_prompt, guidance_scale if use_cfg else 1.0

    def _callback(self, callback_on_step_end, tensor_inputs, named: dict, steps: int, guidance_scale: float,
                  joint_attention_kwargs, blend=None):
        """The pipeline's step callback on the latents in its dtype, with the pipeline's properties a callback reads
        set as its own loop sets them; `blend`, inpainting's step-end mix (`step_callback`)."""
        pipe, dtype = self.pipe, named["prompt_embeds"].dtype
        pipe._num_timesteps, pipe._guidance_scale, pipe._interrupt = steps, guidance_scale, False
        pipe._joint_attention_kwargs = joint_attention_kwargs
        state = {name: torch.cat([named[f"negative_{name}"], named[name]]) if f"negative_{name}" in named
                 else named[name] for name in ("prompt_embeds", "pooled_prompt_embeds")}  # as its loop holds them
        return step_callback(pipe, callback_on_step_end, tensor_inputs, state, lambda x: x.to(dtype),
                             lambda latents: latents.float(), blend)

    def _schedule(self, sigmas, mu, height: int, width: int) -> dict:
        """The scheduler's overrides: the custom sigmas, and mu where the scheduler shifts by resolution."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        pipe, config = self.pipe, self.pipe.scheduler.config
        overrides = {} if sigmas is None else {"sigmas": tuple(float(v) for v in sigmas)}
        if mu is None and config.get("use_dynamic_shifting", None):
            step = pipe.vae_scale_factor * pipe.transformer.config.patch_size
            mu = calculate_shift((int(height) // step) * (int(width) // step),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        if mu is not None:
            overrides["mu"] = mu
        return overrides

    def _finish(self, latents: torch.Tensor, output_type, return_dict: bool):
        """The latents, decoded by the pipeline's VAE unless latents are asked."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3PipelineOutput

        pipe = self.pipe
        if output_type == "latent":
            image = latents
        else:
            decoded = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(decoded, return_dict=False)[0],
                                                     output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


class AcceleratedSD3Img2ImgPipeline(AcceleratedSD3Pipeline):
    """Called like `StableDiffusion3Img2ImgPipeline`, returning what it returns; the denoising loop runs in
    ditengine. The image goes through the pipeline's own preprocessing, VAE encode and noising to the first step of
    the strength-truncated schedule (`prepare_latents`), outside the loop; the loop runs the schedule's last
    `strength` share of steps (`FlowMatchEuler(begin_index=...)`). The same arguments as `AcceleratedSD3Pipeline`
    are refused."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height: int | None = None,
                 width: int | None = None, image=None, strength: float = 0.6, num_inference_steps: int = 50,
                 sigmas=None, guidance_scale: float = 7.0, negative_prompt=None, negative_prompt_2=None,
                 negative_prompt_3=None, num_images_per_prompt: int | None = 1, generator=None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                 ip_adapter_image=None, ip_adapter_image_embeds=None, return_dict: bool = True,
                 joint_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 256, mu: float | None = None):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        refuse_unsupported(generator, ip_adapter_image=ip_adapter_image,
                           ip_adapter_image_embeds=ip_adapter_image_embeds)
        scale = lora_scale(joint_attention_kwargs)
        if image is None:
            raise ValueError("image: required by the image-to-image pipeline (a PIL image, array or tensor)")
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, strength, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, cfg = self._prompts(prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2,
                                         negative_prompt_3, guidance_scale, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                         clip_skip, max_sequence_length, scale if joint_attention_kwargs else None)
        dtype = named["prompt_embeds"].dtype
        image = pipe.image_processor.preprocess(image, height=height, width=width)
        overrides = self._schedule(sigmas, mu, height, width)
        steps = num_inference_steps if sigmas is None else len(sigmas)
        timesteps, left = self.strength_schedule(steps, strength, num_inference_steps, sigmas,
                                                 **({"mu": overrides["mu"]} if "mu" in overrides else {}))
        if latents is None:  # given latents are the loop's start as they are, as the pipeline takes them
            latents = pipe.prepare_latents(image, timesteps[:1].repeat(rows), rows // max(num_images_per_prompt, 1),
                                           num_images_per_prompt, dtype, self.device, generator)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, left,
                                  guidance_scale, joint_attention_kwargs)
        out = self.denoise(latents, steps, cfg, generator, {**overrides, "begin_index": steps - left},
                           lora_scale=scale, callback=callback, **named)
        return self._finish(out.to(dtype), output_type, return_dict)


class AcceleratedSD3InpaintPipeline(AcceleratedSD3Pipeline):
    """Called like `StableDiffusion3InpaintPipeline` (a 16-channel SD3 / SD3.5 transformer), returning what it returns;
    the denoising loop runs in ditengine. The image and mask go through the pipeline's own preprocessing, VAE encode,
    noising and mask latents outside the loop; after every step the latents outside the mask are replaced by the
    original ones noised to the next step, as the pipeline does (between steps: with it the whole-loop graph falls
    back to per-step graphs). A 33-channel inpainting transformer, `padding_mask_crop` and the IP-Adapter inputs
    raise a ValueError."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, image=None, mask_image=None,
                 masked_image_latents=None, height: int | None = None, width: int | None = None,
                 padding_mask_crop: int | None = None, strength: float = 0.6, num_inference_steps: int = 50,
                 sigmas=None, guidance_scale: float = 7.0, negative_prompt=None, negative_prompt_2=None,
                 negative_prompt_3=None, num_images_per_prompt: int | None = 1, generator=None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, output_type: str | None = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 256, mu: float | None = None):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        refuse_unsupported(generator, padding_mask_crop=padding_mask_crop, ip_adapter_image=ip_adapter_image,
                           ip_adapter_image_embeds=ip_adapter_image_embeds)
        if pipe.transformer.config.in_channels != 16:
            raise ValueError(f"transformer: a {pipe.transformer.config.in_channels}-channel inpainting transformer "
                             "(latents, mask and masked image concatenated) is not served; a 16-channel one is")
        scale = lora_scale(joint_attention_kwargs)
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, prompt_3, height, width, strength, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, cfg = self._prompts(prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2,
                                         negative_prompt_3, guidance_scale, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                         clip_skip, max_sequence_length, scale if joint_attention_kwargs else None)
        dtype = named["prompt_embeds"].dtype
        overrides = self._schedule(sigmas, mu, height, width)
        steps = num_inference_steps if sigmas is None else len(sigmas)
        timesteps, left = self.strength_schedule(steps, strength, num_inference_steps, sigmas,
                                                 **({"mu": overrides["mu"]} if "mu" in overrides else {}))
        init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        batch = rows // num_images_per_prompt
        latents, noise, image_latents = pipe.prepare_latents(
            rows, pipe.vae.config.latent_channels, height, width, dtype, self.device, generator, latents,
            image=init_image, timestep=timesteps[:1].repeat(rows), is_strength_max=strength == 1.0,
            return_noise=True, return_image_latents=True)
        mask_condition = check_mask(pipe.mask_processor.preprocess(mask_image, height=height, width=width),
                                    init_image)
        masked = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, _ = pipe.prepare_mask_latents(mask_condition, masked, batch, num_images_per_prompt, height, width, dtype,
                                            self.device, generator, False)
        blend = inpaint_blend(pipe.scheduler, steps - left, left, image_latents, noise, mask)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, left,
                                  guidance_scale, joint_attention_kwargs, blend)
        out = self.denoise(latents, steps, cfg, generator, {**overrides, "begin_index": steps - left},
                           lora_scale=scale, callback=callback, **named)
        return self._finish(out.to(dtype), output_type, return_dict)


families.register(families.Family(
    name="sd3", spec=SD3, config=SD3Config, fast=FastSD3, forward=sd3_forward, reference_cache=True,
    channels=lambda cfg: cfg.in_channels, depth=lambda model: model.config.num_layers,
    diffusers_class="SD3Transformer2DModel", from_diffusers=sd3.from_diffusers, recognises=sd3.is_sd3_state_dict,
    load=families.config_loader(sd3.load_state_dict),
    pipelines={"StableDiffusion3Pipeline": AcceleratedSD3Pipeline,
               "StableDiffusion3Img2ImgPipeline": AcceleratedSD3Img2ImgPipeline,
               "StableDiffusion3InpaintPipeline": AcceleratedSD3InpaintPipeline},
    bench=(lambda name: name.upper().startswith("SD3"), "ditengine.bench.sd3:sd3_setup")))
