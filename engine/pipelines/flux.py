"""Flux.1 (dev, schnell): `FluxPipeline` accelerated, the reference loop's call of the model (as FluxPipeline calls
its transformer: 2x2 packed latents, t / 1000), and the family record (diffusers and BFL checkpoints)."""
from __future__ import annotations

import functools

import torch

from .. import families
from ..cache import Stages
from ..fast.flux import FastFlux, check_inputs, pack_latents, unpack_latents
from ..models import flux_checkpoints as flux
from ..models.flux import Flux, FluxConfig
from ..sampling import Forward, doubled
from .base import Accelerated, check_call, check_mask, inpaint_blend, lora_scale, refuse_unsupported, step_callback


def flux_forward(model, spec: Flux, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named) -> Forward:
    """`model` (the reference spec `spec`, or diffusers' transformer with its weights) called as FluxPipeline calls it:
    the loop's (B, 16, H, W) latents packed into 2x2 patches, t / 1000
    in the latents' dtype, the guidance for dev, the negative prompt as the unconditional half (true CFG)."""
    cond = check_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    dtype = next(model.parameters()).dtype
    text = doubled(cond["prompt_embeds"], cond.get("negative_prompt_embeds"), use_cfg).to(dtype)
    pooled = doubled(cond["pooled_prompt_embeds"], cond.get("negative_pooled_prompt_embeds"), use_cfg).to(dtype)
    guidance = cond["guidance"]
    guidance = None if guidance is None else doubled(guidance, guidance, use_cfg)

    condition = cond["condition_latents"]
    condition = None if condition is None else doubled(condition, condition, use_cfg).to(dtype)
    reference = cond["reference_latents"]
    reference = None if reference is None else doubled(reference, reference, use_cfg).to(dtype)
    img_ids = cond["img_ids"] if reference is None else torch.cat([cond["img_ids"], cond["reference_ids"]])

    def forward(x_in, t, step):
        n, _, H, W = x_in.shape
        packed = pack_latents(x_in)
        T = packed.shape[1]
        if condition is not None:  # Fill / Control: the packed condition beside the latents, every step
            packed = torch.cat([packed, condition[:n]], dim=2)
        if reference is not None:  # Kontext: the reference tokens after the image's
            packed = torch.cat([packed, reference[:n]], dim=1)
        kw = dict(encoder_hidden_states=text[:n], pooled_projections=pooled[:n], timestep=t.to(dtype) / 1000,
                  img_ids=img_ids, txt_ids=cond["txt_ids"], guidance=None if guidance is None else guidance[:n])
        if cache is not None:
            out = cache(flux_stages(spec, packed, **kw), step)
        else:
            out = model(packed, **kw, return_dict=False)[0]
        return unpack_latents(out[:, :T], H, W)  # the image tokens' predictions (not the reference's)

    return forward

def flux_stages(spec: Flux, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance) -> Stages:
    """`Flux.forward` cut for a step cache: the stream is the joint [text; image] sequence (B, L+N, D) throughout,
    as the fused denoiser keeps it."""
    x, context = spec.embed(hidden_states, encoder_hidden_states)  # (B, N, D), (B, L, D)
    temb = spec.timestep_conditioning(timestep, guidance, pooled_projections, x.dtype)
    rope = spec.rope(txt_ids, img_ids)
    L = context.shape[1]

    def double(i, s):
        context, x = spec.double_block(i, s[:, L:], s[:, :L], temb, rope)
        return torch.cat([context, x], dim=1)

    doubles, singles = spec.transformer_blocks, spec.single_transformer_blocks
    return Stages(torch.cat([context, x], dim=1),
                  [functools.partial(double, i) for i in range(len(doubles))]
                  + [functools.partial(spec.single_block, i, temb=temb, rope=rope) for i in range(len(singles))],
                  lambda s: spec.unembed(s[:, L:], temb),
                  [[b.attn, b.ff, b.ff_context] for b in doubles] + [[b.proj_out] for b in singles], spec)


class AcceleratedFluxPipeline(Accelerated):
    """Called like `FluxPipeline` (Flux.1 dev or schnell), returning what it returns; the denoising loop runs in
    ditengine.

    The prompts go through the pipeline's own `encode_prompt` (T5 and CLIP, or the `prompt_embeds` and
    `pooled_prompt_embeds` you pass: a pipeline without text encoders works with embeddings), once per call; the
    latents are drawn and packed as the pipeline does, its resolution-dependent shift mu computed as it does,
    and the image decoded by its VAE. dev embeds `guidance_scale` (no CFG batch); "true CFG" (a negative prompt
    with `true_cfg_scale > 1`) runs [prompt; negative] rows. In fp32 the latents equal the pipeline's within 1e-4
    relative. LoRA adapters on the transformer are served live (`docs/lora.md`: loaded, re-weighted, fused or removed
    before or after `accelerate`), with `joint_attention_kwargs={"scale": s}`; `callback_on_step_end` gets the step
    index, timestep and the packed latents (and prompt embeddings) as diffusers passes them, and latents it returns
    are taken into the loop (the whole-loop graph falls back to per-step graphs). IP-Adapter inputs, other
    `joint_attention_kwargs` and a list of generators raise a ValueError.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                 negative_ip_adapter_image_embeds=None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds,
                             negative_ip_adapter_image=negative_ip_adapter_image,
                             negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, cfg = self._prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale,
                                         num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length,
                                         scale if joint_attention_kwargs else None, guidance_scale)
        C = pipe.transformer.config.in_channels // 4
        packed, named["img_ids"] = pipe.prepare_latents(rows, C, height, width, named["prompt_embeds"].dtype,
                                                        self.device, generator, latents)
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  len(sigmas), guidance_scale, joint_attention_kwargs)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), cfg, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu}, lora_scale=scale, callback=callback,
                           **named)
        return self._finish(out, named["prompt_embeds"].dtype, height, width, output_type, return_dict)

    # -- what the Flux pipelines share around the loop ------------------------------------------------------------
    def _refuse(self, generator, joint_attention_kwargs, **unsupported) -> float:
        """The arguments the accelerated loop does not take refused by name; the call's LoRA scale."""
        refuse_unsupported(generator, **unsupported)
        return lora_scale(joint_attention_kwargs)

    def _callback(self, callback_on_step_end, tensor_inputs, named: dict, height: int, width: int, steps: int,
                  guidance_scale: float, joint_attention_kwargs, blend=None):
        """The pipeline's step callback on its packed latents in its dtype, with the pipeline's properties a callback
        reads (`num_timesteps`, `guidance_scale`, `joint_attention_kwargs`) set as its own loop sets them; `blend`,
        inpainting's step-end mix (`step_callback`)."""
        pipe, dtype = self.pipe, named["prompt_embeds"].dtype
        pipe._num_timesteps, pipe._guidance_scale, pipe._interrupt = steps, guidance_scale, False
        pipe._joint_attention_kwargs = joint_attention_kwargs
        return step_callback(pipe, callback_on_step_end, tensor_inputs, named, lambda x: pack_latents(x).to(dtype),
                             lambda latents: self._unpack(latents, height, width).float(), blend)

    def _prompts(self, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, num_images_per_prompt,
                 prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds,
                 max_sequence_length, text_lora_scale, guidance_scale) -> tuple[dict, int, float]:
        """The prompts through the pipeline's own `encode_prompt` (the negative one for true CFG): (the loop's named
        conditioning, the rows it samples, its CFG scale: 1 without true CFG)."""
        pipe = self.pipe
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        true_cfg = true_cfg_scale > 1 and has_negative
        encode = dict(device=self.device, num_images_per_prompt=num_images_per_prompt,
                      max_sequence_length=max_sequence_length, lora_scale=text_lora_scale)
        prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            **encode)
        named = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, txt_ids=text_ids)
        if true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = pipe.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode)
            named.update(negative_prompt_embeds=negative_prompt_embeds,
                         negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        if pipe.transformer.config.guidance_embeds:
            named["guidance"] = guidance_scale
        return named, batch * num_images_per_prompt, true_cfg_scale if true_cfg else 1.0

    def _schedule(self, num_inference_steps: int, sigmas, height: int, width: int):
        """The pipeline's sigma grid (before its shift) and its resolution-dependent shift mu."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipe, config = self.pipe, self.pipe.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        tokens = (int(height) // pipe.vae_scale_factor // 2) * (int(width) // pipe.vae_scale_factor // 2)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return sigmas, mu

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """The VAE latent grid (h, w) of an image, even in both (2x2 patches)."""
        f = self.pipe.vae_scale_factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def _unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's packed latents (B, h/2 * w/2, 4C) of an image this size -> the loop's (B, C, h, w)."""
        return unpack_latents(packed, *self._grid(height, width))

    def _finish(self, out: torch.Tensor, dtype, height: int, width: int, output_type, return_dict: bool):
        """The loop's fp32 latents packed as the pipeline packs them, decoded by its VAE unless latents are asked."""
        from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput

        pipe = self.pipe
        latents = pack_latents(out.to(dtype))
        if output_type == "latent":
            image = latents
        else:
            unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0],
                                                     output_type=output_type)
        pipe.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)


class AcceleratedFluxImg2ImgPipeline(AcceleratedFluxPipeline):
    """Called like `FluxImg2ImgPipeline`, returning what it returns; the denoising loop runs in ditengine.

    The image goes through the pipeline's own preprocessing and VAE encode, and its latents are noised to the
    first step of the strength-truncated schedule by the pipeline's own `prepare_latents`, all outside the loop;
    the loop then runs the schedule's last `strength` share of steps (`FlowMatchEuler(begin_index=...)`). The same
    arguments as `AcceleratedFluxPipeline` are refused."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 7.0,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                 negative_ip_adapter_image_embeds=None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds,
                             negative_ip_adapter_image=negative_ip_adapter_image,
                             negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        if image is None:
            raise ValueError("image: required by the image-to-image pipeline (a PIL image, array or tensor)")
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, strength, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        named, rows, cfg = self._prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale,
                                         num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length,
                                         scale if joint_attention_kwargs else None, guidance_scale)
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        timesteps, steps = self.strength_schedule(len(sigmas), strength, num_inference_steps, sigmas, mu=mu)
        packed, named["img_ids"] = pipe.prepare_latents(
            init_image, timesteps[:1].repeat(rows), rows, pipe.transformer.config.in_channels // 4, height, width,
            named["prompt_embeds"].dtype, self.device, generator, latents)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  steps, guidance_scale, joint_attention_kwargs)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), cfg, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu, "begin_index": len(sigmas) - steps},
                           lora_scale=scale, callback=callback, **named)
        return self._finish(out, named["prompt_embeds"].dtype, height, width, output_type, return_dict)


class AcceleratedFluxKontextPipeline(AcceleratedFluxPipeline):
    """Called like `FluxKontextPipeline` (FLUX.1-Kontext: editing by a reference image), returning what it returns;
    the denoising loop runs in ditengine. The output size is fitted to `max_area` and the reference image resized to
    Kontext's preferred resolution and encoded by the pipeline's own code, outside the loop; its packed latents and
    position ids ride along every step as extra tokens after the image's (`reference_latents`, `reference_ids`),
    embedded once per call into a static buffer, and their outputs dropped, as the pipeline drops them. Without an
    image it is text to image. IP-Adapter inputs and a list of generators raise a ValueError."""

    @torch.no_grad()
    def __call__(self, image=None, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                 negative_ip_adapter_image_embeds=None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512,
                 max_area: int = 1024**2, _auto_resize: bool = True):
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds,
                             negative_ip_adapter_image=negative_ip_adapter_image,
                             negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        height, width = self.default_size(height, width)
        multiple_of = pipe.vae_scale_factor * 2  # the output fitted to max_area at its aspect ratio, as the pipeline
        aspect_ratio = width / height
        width = round((max_area * aspect_ratio) ** 0.5) // multiple_of * multiple_of
        height = round((max_area / aspect_ratio) ** 0.5) // multiple_of * multiple_of
        pipe.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, cfg = self._prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale,
                                         num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length,
                                         scale if joint_attention_kwargs else None, guidance_scale)
        dtype = named["prompt_embeds"].dtype
        if image is not None and not (isinstance(image, torch.Tensor) and image.size(1) == pipe.latent_channels):
            first = image[0] if isinstance(image, list) else image
            image_height, image_width = pipe.image_processor.get_default_height_width(first)
            if _auto_resize:  # Kontext's preferred resolution nearest the image's aspect ratio
                ratio = image_width / image_height
                _, image_width, image_height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
            image_width = image_width // multiple_of * multiple_of
            image_height = image_height // multiple_of * multiple_of
            image = pipe.image_processor.resize(image, image_height, image_width)
            image = pipe.image_processor.preprocess(image, image_height, image_width)
        packed, reference, named["img_ids"], reference_ids = pipe.prepare_latents(
            image, rows, pipe.transformer.config.in_channels // 4, height, width, dtype, self.device, generator,
            latents)
        if reference is not None:
            named.update(reference_latents=reference, reference_ids=reference_ids)
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  len(sigmas), guidance_scale, joint_attention_kwargs)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), cfg, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu}, lora_scale=scale,
                           callback=callback, **named)
        return self._finish(out, dtype, height, width, output_type, return_dict)


class AcceleratedFluxInpaintPipeline(AcceleratedFluxPipeline):
    """Called like `FluxInpaintPipeline`, returning what it returns; the denoising loop runs in ditengine. The image
    and mask go through the pipeline's own preprocessing, VAE encode, noising and mask packing outside the loop; after
    every step the latents outside the mask are replaced by the original ones noised to the next step, as the
    pipeline does (between steps: with it the whole-loop graph falls back to per-step graphs). `padding_mask_crop`
    and the IP-Adapter inputs raise a ValueError; callbacks and LoRA as for `FluxPipeline`."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 true_cfg_scale: float = 1.0, image=None, mask_image=None, masked_image_latents=None,
                 height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
                 strength: float = 0.6, num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 7.0,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, negative_ip_adapter_image=None,
                 negative_ip_adapter_image_embeds=None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, joint_attention_kwargs: dict | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs, padding_mask_crop=padding_mask_crop,
                             ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                             negative_ip_adapter_image=negative_ip_adapter_image,
                             negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds)
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, image, mask_image, strength, height, width, output_type=output_type,
                          negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          padding_mask_crop=padding_mask_crop, max_sequence_length=max_sequence_length)
        init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        named, rows, cfg = self._prompts(prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale,
                                         num_images_per_prompt, prompt_embeds, pooled_prompt_embeds,
                                         negative_prompt_embeds, negative_pooled_prompt_embeds, max_sequence_length,
                                         scale if joint_attention_kwargs else None, guidance_scale)
        dtype = named["prompt_embeds"].dtype
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        timesteps, steps = self.strength_schedule(len(sigmas), strength, num_inference_steps, sigmas, mu=mu)
        C = pipe.transformer.config.in_channels // 4
        packed, noise, image_latents, named["img_ids"] = pipe.prepare_latents(
            init_image, timesteps[:1].repeat(rows), rows, C, height, width, dtype, self.device, generator, latents)
        mask_condition = check_mask(pipe.mask_processor.preprocess(mask_image, height=height, width=width),
                                    init_image)
        masked = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, _ = pipe.prepare_mask_latents(mask_condition, masked, rows // num_images_per_prompt, C,
                                            num_images_per_prompt, height, width, dtype, self.device, generator)
        begin = len(sigmas) - steps
        blend = inpaint_blend(pipe.scheduler, begin, steps, image_latents, noise, mask)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  steps, guidance_scale, joint_attention_kwargs, blend)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), cfg, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu, "begin_index": begin},
                           lora_scale=scale, callback=callback, **named)
        return self._finish(out, dtype, height, width, output_type, return_dict)


class AcceleratedFluxFillPipeline(AcceleratedFluxPipeline):
    """Called like `FluxFillPipeline` (FLUX.1-Fill: inpainting and outpainting), returning what it returns; the
    denoising loop runs in ditengine. The image and mask go through the pipeline's own preprocessing, VAE encode and
    `prepare_mask_latents` outside the loop (or its `masked_image_latents` are taken as given); the packed masked
    image and mask (`condition_latents`) are written once per call into a static buffer and concatenated to the
    latents on the channel axis at every step, as the pipeline does. `strength` < 1 runs the schedule's tail as
    image to image does. A list of generators raises a ValueError; callbacks and LoRA as for `FluxPipeline`."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, masked_image_latents=None,
                 height: int | None = None, width: int | None = None, strength: float = 1.0,
                 num_inference_steps: int = 50, sigmas=None, guidance_scale: float = 30.0,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 output_type: str | None = "pil", return_dict: bool = True, joint_attention_kwargs: dict | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs)
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, strength, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, image=image, mask_image=mask_image,
                          masked_image_latents=masked_image_latents,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        init_image = pipe.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        named, rows, _ = self._prompts(prompt, prompt_2, None, None, 1.0, num_images_per_prompt, prompt_embeds,
                                       pooled_prompt_embeds, None, None, max_sequence_length,
                                       scale if joint_attention_kwargs else None, guidance_scale)
        dtype = named["prompt_embeds"].dtype
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        timesteps, steps = self.strength_schedule(len(sigmas), strength, num_inference_steps, sigmas, mu=mu)
        C = pipe.vae.config.latent_channels
        packed, named["img_ids"] = pipe.prepare_latents(init_image, timesteps[:1].repeat(rows), rows, C, height,
                                                        width, dtype, self.device, generator, latents)
        if masked_image_latents is None:  # the pipeline's own: masked image latents, then the 8x8-packed mask
            mask = check_mask(pipe.mask_processor.preprocess(mask_image, height=height, width=width), init_image)
            masked = (init_image * (1 - mask)).to(device=self.device, dtype=dtype)
            mask, masked_image_latents = pipe.prepare_mask_latents(
                mask, masked, rows // num_images_per_prompt, C, num_images_per_prompt, *init_image.shape[-2:], dtype,
                self.device, generator)
            masked_image_latents = torch.cat((masked_image_latents, mask), dim=-1)
        named["condition_latents"] = masked_image_latents.to(self.device)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  steps, guidance_scale, joint_attention_kwargs)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), 1.0, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu, "begin_index": len(sigmas) - steps},
                           lora_scale=scale, callback=callback, **named)
        return self._finish(out, dtype, height, width, output_type, return_dict)


class AcceleratedFluxControlPipeline(AcceleratedFluxPipeline):
    """Called like `FluxControlPipeline` (FLUX.1-Depth, FLUX.1-Canny), returning what it returns; the denoising loop
    runs in ditengine. The control image goes through the pipeline's own `prepare_image` and VAE encode outside the
    loop; its packed latents (`condition_latents`) are written once per call into a static buffer and concatenated
    to the latents on the channel axis at every step, as the pipeline does."""

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, control_image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 28, sigmas=None, guidance_scale: float = 3.5,
                 num_images_per_prompt: int | None = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 output_type: str | None = "pil", return_dict: bool = True, joint_attention_kwargs: dict | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length: int = 512):
        check_call(num_inference_steps, guidance_scale)
        pipe = self.pipe
        scale = self._refuse(generator, joint_attention_kwargs)
        if control_image is None:
            raise ValueError("control_image: required by the control pipeline (a PIL image, array or tensor)")
        height, width = self.default_size(height, width)
        pipe.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        named, rows, _ = self._prompts(prompt, prompt_2, None, None, 1.0, num_images_per_prompt, prompt_embeds,
                                       pooled_prompt_embeds, None, None, max_sequence_length,
                                       scale if joint_attention_kwargs else None, guidance_scale)
        dtype = named["prompt_embeds"].dtype
        C = pipe.transformer.config.in_channels // 8
        control = pipe.prepare_image(image=control_image, width=width, height=height, batch_size=rows,
                                     num_images_per_prompt=num_images_per_prompt, device=self.device,
                                     dtype=pipe.vae.dtype)
        if control.ndim == 4:  # an image: encoded as the pipeline encodes it (before the latents are drawn)
            control = pipe.vae.encode(control).latent_dist.sample(generator=generator)
            control = (control - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            control = pipe._pack_latents(control, rows, C, *control.shape[2:])
        packed, named["img_ids"] = pipe.prepare_latents(rows, C, height, width, dtype, self.device, generator,
                                                        latents)
        named["condition_latents"] = control
        sigmas, mu = self._schedule(num_inference_steps, sigmas, height, width)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, named, height, width,
                                  len(sigmas), guidance_scale, joint_attention_kwargs)
        out = self.denoise(self._unpack(packed, height, width), len(sigmas), 1.0, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu}, lora_scale=scale,
                           callback=callback, **named)
        return self._finish(out, dtype, height, width, output_type, return_dict)


families.register(families.Family(
    name="flux", spec=Flux, config=FluxConfig, fast=FastFlux, forward=flux_forward, reference_cache=True,
    channels=lambda cfg: cfg.out_channels // 4,
    depth=lambda model: model.config.num_layers + model.config.num_single_layers,
    diffusers_class="FluxTransformer2DModel", from_diffusers=flux.from_diffusers, recognises=flux.is_flux_state_dict,
    load=families.config_loader(flux.load_state_dict),
    pipelines={"FluxPipeline": AcceleratedFluxPipeline, "FluxImg2ImgPipeline": AcceleratedFluxImg2ImgPipeline,
               "FluxInpaintPipeline": AcceleratedFluxInpaintPipeline, "FluxFillPipeline": AcceleratedFluxFillPipeline,
               "FluxControlPipeline": AcceleratedFluxControlPipeline,
               "FluxKontextPipeline": AcceleratedFluxKontextPipeline},
    bench=(lambda name: name.lower().replace("_", "-").startswith("flux"), "ditengine.bench.flux:flux_setup"),
    bench_defaults={"cfg_scale": 1.0}))
