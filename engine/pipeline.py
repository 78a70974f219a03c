"""`ditengine.accelerate(pipe)`: a diffusers pipeline whose denoising loop runs in ditengine.

Served: `DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`, `AceStepPipeline` (ACE-Step 1.5 music),
`FluxPipeline` (Flux.1 dev and schnell), `StableDiffusion3Pipeline` (SD3, SD3.5). The wrapper is called exactly like the
pipeline and returns what it returns; the pipeline's own text encoder (once per call, outside the loop),
VAE and image processing are used as they are, its scheduler is converted (`schedulers.from_diffusers`)
and its transformer converted once (`from_diffusers`). `backend="fused"` (the default) samples through
`FastSampler`; `backend="reference"` through ditengine's reference loop (`ditengine.sample`).
"""
from __future__ import annotations

import logging
import math

import torch

from .checkpoints import from_diffusers
from .fast import DTYPES, FastSampler, fused_denoiser
from .fast.base import QUANTIZE
from .guidance import APG
from .sampling import sample
from .schedulers import DDIM, from_diffusers as scheduler_from_diffusers

log = logging.getLogger("ditengine")

BACKENDS = ("fused", "reference")


def release_weights(transformer: torch.nn.Module, model: torch.nn.Module) -> None:
    """Free a pipeline's transformer weights (and the reference model sharing them) once the fused denoiser holds
    what it needs: every tensor moves to the meta device, so its memory goes wherever the fast path does not alias
    it, and calling the transformer raises a clear error instead of computing on nothing."""
    def refuse(module, args, kwargs):
        raise RuntimeError(f"{type(module).__name__}: its weights were released by ditengine.accelerate(..., "
                           "release_transformer=True); call the accelerated pipeline, or reload the transformer")

    transformer.register_forward_pre_hook(refuse, with_kwargs=True)
    transformer.to("meta")
    model.to("meta")




class _Accelerated:
    """What every accelerated pipeline shares: the model (sharing the pipeline transformer's tensors), its fused
    denoiser built once (one derived copy of the weights, shared by the samplers of every step count and guidance
    scale), scheduler conversion and the loop."""

    def __init__(self, pipe, dtype: torch.dtype | None, cuda_graph: str | None, backend: str,
                 quantize: str | None = None, cfg_interval: tuple | None = None, release_transformer: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
        if quantize is not None and backend != "fused":
            raise ValueError(f"quantize={quantize!r} needs backend='fused'")
        if cuda_graph not in (None, "step", "loop"):
            raise ValueError(f"cuda_graph={cuda_graph!r}: expected None, 'step' or 'loop'")
        if dtype is not None and dtype not in DTYPES:
            raise TypeError(f"dtype: expected None or one of {[str(d) for d in DTYPES]}, got {dtype!r}")
        if release_transformer and backend != "fused":
            raise ValueError("release_transformer=True needs backend='fused' (the reference loop runs the "
                             "transformer's own weights)")
        self.pipe, self.backend, self.cuda_graph = pipe, backend, cuda_graph
        self.quantize, self.cfg_interval = quantize, cfg_interval
        self.device = pipe._execution_device
        self.model = from_diffusers(pipe.transformer).to(self.device).eval()  # shares the transformer's tensors
        own = pipe.transformer.dtype
        self.dtype = dtype or (own if own != torch.float32 else
                               torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.fast = None
        if backend == "reference":
            self.model = self.model.to(self.dtype)  # a copy only when the pipeline runs another dtype
        else:
            self.fast = fused_denoiser(self.model, self.dtype, quantize=quantize)
        self._samplers: dict[tuple, FastSampler] = {}
        if release_transformer:
            release_weights(pipe.transformer, self.model)

    def scheduler(self, num_inference_steps: int, **overrides):
        return scheduler_from_diffusers(self.pipe.scheduler, num_inference_steps, **overrides)

    def denoise(self, noise: torch.Tensor, num_inference_steps: int, guidance_scale: float, generator,
                scheduler_overrides: dict, *conditioning, cfg_interval: tuple | None = None,
                guider: APG | None = None, **named) -> torch.Tensor:
        """The loop on `noise` (unscaled N(0, I) draws), on the chosen backend; fp32 latents. `cfg_interval`
        (default: the wrapper's) and the `guider` are the call's when its pipeline takes them per call."""
        cfg_interval = cfg_interval or self.cfg_interval
        if self.backend == "reference":
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            return sample(self.model, sched, noise.float(), *conditioning, cfg_scale=guidance_scale,
                          generator=generator, progress=False, cfg_interval=cfg_interval, guider=guider, **named)
        key = (num_inference_steps, guidance_scale, tuple(sorted(scheduler_overrides.items())), cfg_interval, guider)
        if key not in self._samplers:
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            self._samplers[key] = FastSampler(self.model, sched, cfg_scale=guidance_scale, dtype=self.dtype,
                                              cuda_graph=self.cuda_graph, quantize=self.quantize,
                                              cfg_interval=cfg_interval, guider=guider, denoiser=self.fast)
        return self._samplers[key](noise.float(), *conditioning, generator=generator, **named)


class AcceleratedDiTPipeline(_Accelerated):
    """Called like `DiTPipeline`: the same latents from the same generator, the pipeline's own scheduler
    (converted by `schedulers.from_diffusers`) and VAE; the denoising loop runs in ditengine.

    For deterministic schedulers (DDIM with eta = 0, Euler, DPM-Solver++) the images equal the
    pipeline's within the compute dtype's tolerance. Stochastic ones draw their step noise for the batch
    rather than for the CFG-doubled batch as diffusers does, so they sample the same distribution with
    other draws. Two documented differences: the initial noise is scaled by the scheduler's
    `init_noise_sigma` (DiTPipeline omits it, which only matters for Euler), and DDIM with non-uniform
    spacing steps between scheduled timesteps (see `schedulers.DDIM`).
    """

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, generator: torch.Generator | None = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True,
                 **scheduler_overrides):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe, cfg = self.pipe, self.model.config
        labels = torch.tensor(class_labels, device=self.device).reshape(-1)
        latents = randn_tensor((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), generator=generator,
                               device=self.device, dtype=pipe.transformer.dtype)
        scale = guidance_scale if guidance_scale > 1 else 1.0  # DiTPipeline guides only above 1
        latents = self.denoise(latents, num_inference_steps, scale, generator, scheduler_overrides, labels)
        latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        samples = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            samples = pipe.numpy_to_pil(samples)
        return ImagePipelineOutput(images=samples) if return_dict else (samples,)


def _aspect_ratio_bins(pipe) -> dict:
    """The pipeline's resolution bins for its transformer's sample size (the same table it would use)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha

    bins = {32: alpha.ASPECT_RATIO_256_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 128: alpha.ASPECT_RATIO_1024_BIN}
    if type(pipe).__name__ == "PixArtSigmaPipeline":
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

        bins[256] = sigma.ASPECT_RATIO_2048_BIN
    size = pipe.transformer.config.sample_size
    if size not in bins:
        raise ValueError(f"use_resolution_binning: no resolution bins for sample_size={size} (the pipeline has them "
                         f"for {sorted(bins)}); pass use_resolution_binning=False")
    return bins[size]


class AcceleratedPixArtPipeline(_Accelerated):
    """Called like `PixArtAlphaPipeline` / `PixArtSigmaPipeline`, returning what they return.

    The prompt is encoded once per call by the pipeline's own `encode_prompt` (T5, or the `prompt_embeds`
    and masks you pass; a pipeline built with `tokenizer=None, text_encoder=None` works with embeddings),
    the latents are drawn as the pipeline draws them, PixArt-alpha 1024's micro-conditions are derived as
    it derives them, and the image is decoded, binned back and post-processed by the pipeline's VAE and
    image processor. In fp32 the latents equal the pipeline's within 1e-4 relative (DPM-Solver++, DDIM).
    Custom `timesteps`/`sigmas` lists and step callbacks are not supported (the schedule is a table built
    before the loop): they raise a ValueError.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt: str = "", num_inference_steps: int = 20, timesteps=None,
                 sigmas=None, guidance_scale: float = 4.5, num_images_per_prompt: int | None = 1,
                 height: int | None = None, width: int | None = None, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, output_type: str | None = "pil",
                 return_dict: bool = True, callback=None, callback_steps: int = 1, clean_caption: bool = True,
                 use_resolution_binning: bool = True, max_sequence_length: int | None = None):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas), ("callback", callback)):
            if value is not None:
                raise ValueError(f"{name}: not supported by the accelerated pipeline (the schedule is a table built "
                                 "before the loop); call the pipeline itself for it")
        if isinstance(generator, list):
            raise ValueError("generator: pass one torch.Generator (a list per image is not supported)")
        if max_sequence_length is None:
            max_sequence_length = 300 if type(pipe).__name__ == "PixArtSigmaPipeline" else 120
        vae_scale = pipe.vae_scale_factor
        height = height or pipe.transformer.config.sample_size * vae_scale
        width = width or pipe.transformer.config.sample_size * vae_scale
        if use_resolution_binning:
            orig_height, orig_width = height, width
            height, width = pipe.image_processor.classify_height_width_bin(height, width,
                                                                           ratios=_aspect_ratio_bins(pipe))
        pipe.check_inputs(prompt, height, width, negative_prompt, callback_steps, prompt_embeds,
                          negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        guided = guidance_scale > 1.0
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = \
            pipe.encode_prompt(prompt, guided, negative_prompt=negative_prompt,
                               num_images_per_prompt=num_images_per_prompt, device=self.device,
                               prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                               prompt_attention_mask=prompt_attention_mask,
                               negative_prompt_attention_mask=negative_prompt_attention_mask,
                               clean_caption=clean_caption, max_sequence_length=max_sequence_length)
        rows = batch * num_images_per_prompt
        shape = (rows, pipe.transformer.config.in_channels, int(height) // vae_scale, int(width) // vae_scale)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt_embeds.dtype)
        else:
            noise = latents.to(self.device)  # the pipeline scales given latents by init_noise_sigma too
        added_cond_kwargs = None
        if type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.transformer.config.sample_size == 128:
            added_cond_kwargs = {
                "resolution": torch.tensor([height, width]).repeat(rows, 1).to(prompt_embeds.dtype),
                "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(prompt_embeds.dtype)}
            added_cond_kwargs = {k: v.to(self.device) for k, v in added_cond_kwargs.items()}
        overrides = {"eta": eta} if isinstance(self.scheduler(1), DDIM) else {}
        conditioning = dict(prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
                            added_cond_kwargs=added_cond_kwargs)
        if guided:
            conditioning.update(negative_prompt_embeds=negative_prompt_embeds,
                                negative_prompt_attention_mask=negative_prompt_attention_mask)
        out = self.denoise(noise, num_inference_steps, guidance_scale if guided else 1.0, generator, overrides,
                           **conditioning)
        out = out.to(prompt_embeds.dtype)
        if output_type == "latent":
            image = out
        else:
            image = pipe.vae.decode(out.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                image = pipe.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


class AcceleratedAceStepPipeline(_Accelerated):
    """Called like `AceStepPipeline` (ACE-Step 1.5: text, lyrics, duration, the turbo or the base/SFT DiT),
    returning what it returns; the denoising loop runs in ditengine.

    The prompt and lyrics are encoded, the source and timbre latents, chunk mask and packed condition built, and
    the audio decoded and loudness-normalised by the pipeline's own components, once per call, as the pipeline
    does; the latents are drawn as it draws them. The loop is the pipeline's: its shifted sigma grid (or your
    `timesteps`) through the flow-match Euler step, and for the base model (guidance_scale > 1, not turbo) APG
    on [condition; null condition] at the steps inside [cfg_interval_start, cfg_interval_end] of 1 - t, the
    others on the condition alone. In fp32 the latents equal the pipeline's within 1e-4 relative.

    Step callbacks, `audio_codes` (the 5 Hz planner's codes), `audio_cover_strength < 1` (a second condition
    per step) and `attention_kwargs` (LoRA scales) are not supported: they raise a ValueError.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, lyrics="", audio_duration: float = 60.0, vocal_language="en",
                 num_inference_steps: int = 8, guidance_scale: float = 7.0, shift: float = 3.0, generator=None,
                 latents: torch.Tensor | None = None, output_type: str | None = "pt", return_dict: bool = True,
                 callback=None, callback_steps: int | None = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), instruction: str | None = None,
                 max_text_length: int = 256, max_lyric_length: int = 2048, bpm: int | None = None,
                 keyscale: str | None = None, timesignature: str | None = None, task_type: str = "text2music",
                 track_name: str | None = None, complete_track_classes=None, src_audio: torch.Tensor | None = None,
                 reference_audio: torch.Tensor | None = None, audio_codes=None, repainting_start: float | None = None,
                 repainting_end: float | None = None, audio_cover_strength: float = 1.0,
                 cfg_interval_start: float = 0.0, cfg_interval_end: float = 1.0, timesteps=None,
                 attention_kwargs: dict | None = None):
        from diffusers.pipelines.pipeline_utils import AudioPipelineOutput

        pipe = self.pipe
        for name, value in (("callback", callback), ("callback_on_step_end", callback_on_step_end),
                            ("audio_codes", audio_codes), ("attention_kwargs", attention_kwargs or None)):
            if value is not None:
                raise ValueError(f"{name}: not supported by the accelerated pipeline (the loop is a static plan); "
                                 "call the pipeline itself for it")
        if audio_cover_strength < 1.0 and task_type == "cover":
            raise ValueError("audio_cover_strength < 1: not supported by the accelerated pipeline (a second "
                             "condition per step); call the pipeline itself for it")
        if not isinstance(prompt, (str, list)):
            raise ValueError("prompt: expected a string or a list of strings, as AceStepPipeline takes it")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        device, dtype = self.device, pipe.transformer.dtype
        if pipe.is_turbo and guidance_scale > 1.0:
            log.warning("ditengine: guidance_scale %s is ignored for turbo (guidance-distilled) ACE-Step checkpoints",
                        guidance_scale)
            guidance_scale = 1.0
        pipe.check_inputs(prompt=prompt, lyrics=lyrics, task_type=task_type, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, shift=shift, audio_cover_strength=audio_cover_strength,
                          cfg_interval_start=cfg_interval_start, cfg_interval_end=cfg_interval_end,
                          repainting_start=repainting_start, repainting_end=repainting_end)
        if instruction is None:
            instruction = pipe._get_task_instruction(task_type=task_type, track_name=track_name,
                                                     complete_track_classes=complete_track_classes)
        has_src_audio = src_audio is not None
        if has_src_audio and (audio_duration is None or audio_duration <= 0):
            audio_duration = src_audio.shape[-1] / pipe.sample_rate
        if audio_duration is None or audio_duration <= 0:
            audio_duration = 60.0
        text, text_mask, lyric, lyric_mask = pipe.encode_prompt(
            prompt=prompt, lyrics=lyrics, device=device, vocal_language=vocal_language, audio_duration=audio_duration,
            instruction=instruction, bpm=bpm, keyscale=keyscale, timesignature=timesignature,
            max_text_length=max_text_length, max_lyric_length=max_lyric_length)
        src_latents, length = pipe.prepare_src_latents(
            device=device, dtype=dtype, batch_size=batch, src_audio=src_audio,
            latent_length=math.ceil(audio_duration * pipe.latents_per_second), task_type=task_type)
        if reference_audio is not None:
            timbre, timbre_order = pipe.prepare_reference_audio_latents(
                reference_audio=reference_audio, batch_size=batch, device=device, dtype=dtype)
        else:  # the learned silence latent, as the pipeline uses it (zeros would be out of distribution)
            frames = math.ceil(30 * pipe.latents_per_second)
            timbre = pipe.condition_encoder.silence_latent[:, :frames].to(device=device, dtype=dtype).expand(
                batch, -1, -1).contiguous()
            timbre_order = torch.arange(batch, device=device, dtype=torch.long)
        condition, _ = pipe.condition_encoder(
            text_hidden_states=text, text_attention_mask=text_mask, lyric_hidden_states=lyric,
            lyric_attention_mask=lyric_mask, refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=timbre_order)
        chunk_mask = pipe._build_chunk_mask(
            task_type=task_type, latent_length=length, batch_size=batch, device=device, dtype=dtype,
            acoustic_dim=pipe.transformer.config.audio_acoustic_hidden_dim, repainting_start=repainting_start,
            repainting_end=repainting_end, has_src_audio=has_src_audio)
        if task_type == "repaint" and has_src_audio:
            silence, _ = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=batch, latent_length=length)
            src_latents = torch.where(chunk_mask > 0.5, silence, src_latents)
        context = torch.cat([src_latents, chunk_mask], dim=-1)  # (B, T, C_ctx)
        noise = pipe.prepare_latents(batch_size=batch, audio_duration=length / pipe.latents_per_second, dtype=dtype,
                                     device=device, generator=generator, latents=latents)  # (B, T, C)
        guided = guidance_scale > 1.0 and not pipe.is_turbo
        named = dict(encoder_hidden_states=condition, context_latents=context.transpose(1, 2).contiguous())
        if guided:
            null = getattr(pipe.condition_encoder, "null_condition_emb", None)
            if null is None:
                raise ValueError("guidance_scale > 1 needs the condition encoder's null_condition_emb (a base/SFT "
                                 "checkpoint), or pass guidance_scale=1.0")
            named["null_encoder_hidden_states"] = null.to(device=device, dtype=condition.dtype).expand_as(condition)
        sigmas = pipe._get_timestep_schedule(num_inference_steps=num_inference_steps, shift=shift, device=device,
                                             dtype=torch.float32, timesteps=timesteps)
        # The pipeline guides where cfg_interval_start <= 1 - t <= cfg_interval_end: t in [1 - end, 1 - start].
        interval = (1.0 - cfg_interval_end, 1.0 - cfg_interval_start) if guided else None
        out = self.denoise(noise.transpose(1, 2).contiguous(), len(sigmas), guidance_scale if guided else 1.0, generator,
                           {"sigmas": tuple(sigmas.tolist())}, cfg_interval=interval,
                           guider=APG() if guided else None, **named)
        latents = out.transpose(1, 2).to(dtype)  # (B, T, C), as the pipeline returns them
        if output_type == "latent":
            pipe.maybe_free_model_hooks()
            return AudioPipelineOutput(audios=latents) if return_dict else (latents,)
        audio = pipe.vae.decode(latents.transpose(1, 2)).sample.float()
        peak = audio.abs().amax(dim=[1, 2], keepdim=True)
        if torch.any(peak > 1.0):  # the pipeline's anti-clip, then its -1 dBFS loudness normalisation
            audio = audio / peak.clamp(min=1.0)
        audio = audio * (10.0 ** (-1.0 / 20.0) / audio.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6))
        if output_type == "np":
            audio = audio.cpu().numpy()
        pipe.maybe_free_model_hooks()
        return AudioPipelineOutput(audios=audio) if return_dict else (audio,)


def _refuse_unsupported(generator, **unsupported) -> None:
    """The MMDiT pipelines' arguments the accelerated loop does not take: a ValueError naming the first one given,
    or a list of generators."""
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"{name}: not supported by the accelerated pipeline; call the pipeline itself for it")
    if isinstance(generator, list):
        raise ValueError("generator: pass one torch.Generator (a list per image is not supported)")


class AcceleratedFluxPipeline(_Accelerated):
    """Called like `FluxPipeline` (Flux.1 dev or schnell), returning what it returns; the denoising loop runs in
    ditengine.

    The prompts go through the pipeline's own `encode_prompt` (T5 and CLIP, or the `prompt_embeds` and
    `pooled_prompt_embeds` you pass: a pipeline without text encoders works with embeddings), once per call; the
    latents are drawn and packed as the pipeline does, its resolution-dependent shift mu computed as it does,
    and the image decoded by its VAE. dev embeds `guidance_scale` (no CFG batch); "true CFG" (a negative prompt
    with `true_cfg_scale > 1`) runs [prompt; negative] rows. In fp32 the latents equal the pipeline's within 1e-4
    relative. IP-Adapter inputs, `joint_attention_kwargs`, step callbacks and a list of generators raise a
    ValueError.
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
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput, calculate_shift

        pipe = self.pipe
        _refuse_unsupported(generator, ip_adapter_image=ip_adapter_image,
                            ip_adapter_image_embeds=ip_adapter_image_embeds,
                            negative_ip_adapter_image=negative_ip_adapter_image,
                            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
                            joint_attention_kwargs=joint_attention_kwargs or None,
                            callback_on_step_end=callback_on_step_end)
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        true_cfg = true_cfg_scale > 1 and has_negative
        encode = dict(device=self.device, num_images_per_prompt=num_images_per_prompt,
                      max_sequence_length=max_sequence_length)
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
        rows, C = batch * num_images_per_prompt, pipe.transformer.config.in_channels // 4
        packed, image_ids = pipe.prepare_latents(rows, C, height, width, prompt_embeds.dtype, self.device, generator,
                                                 latents)
        named["img_ids"] = image_ids
        h, w = 2 * (int(height) // (pipe.vae_scale_factor * 2)), 2 * (int(width) // (pipe.vae_scale_factor * 2))
        noise = packed.view(rows, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(rows, C, h, w)
        if pipe.transformer.config.guidance_embeds:
            named["guidance"] = guidance_scale
        config = pipe.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        mu = calculate_shift(packed.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        out = self.denoise(noise, len(sigmas), true_cfg_scale if true_cfg else 1.0, generator,
                           {"sigmas": tuple(float(v) for v in sigmas), "mu": mu}, **named)
        out = out.to(prompt_embeds.dtype)
        latents = out.view(rows, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(rows, -1, 4 * C)
        if output_type == "latent":
            image = latents
        else:
            unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0],
                                                     output_type=output_type)
        pipe.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)


class AcceleratedSD3Pipeline(_Accelerated):
    """Called like `StableDiffusion3Pipeline` (SD3 and SD3.5), returning what it returns; the denoising loop runs
    in ditengine.

    The prompts go through the pipeline's own `encode_prompt` (CLIP-L, CLIP-G and T5, or the `prompt_embeds`,
    `pooled_prompt_embeds` and negative ones you pass: a pipeline without text encoders works with embeddings),
    once per call; the latents are drawn as the pipeline draws them, the scheduler's shift (and mu, when it
    shifts dynamically) applied as it does, and the image decoded by its VAE. `guidance_scale > 1` runs the CFG
    batch. In fp32 the latents equal the pipeline's within 1e-4 relative. IP-Adapter inputs,
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
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            StableDiffusion3PipelineOutput, calculate_shift)

        pipe = self.pipe
        _refuse_unsupported(generator, ip_adapter_image=ip_adapter_image,
                            ip_adapter_image_embeds=ip_adapter_image_embeds,
                            joint_attention_kwargs=joint_attention_kwargs or None,
                            skip_guidance_layers=skip_guidance_layers, callback_on_step_end=callback_on_step_end)
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
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, do_classifier_free_guidance=use_cfg,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=self.device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length)
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
                               **named).to(prompt_embeds.dtype)
        if output_type == "latent":
            image = latents
        else:
            decoded = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.image_processor.postprocess(pipe.vae.decode(decoded, return_dict=False)[0],
                                                     output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


_PIPELINES = {"DiTPipeline": AcceleratedDiTPipeline, "PixArtAlphaPipeline": AcceleratedPixArtPipeline,
              "PixArtSigmaPipeline": AcceleratedPixArtPipeline, "AceStepPipeline": AcceleratedAceStepPipeline,
              "FluxPipeline": AcceleratedFluxPipeline, "StableDiffusion3Pipeline": AcceleratedSD3Pipeline}


def accelerate(pipe, dtype: torch.dtype | None = None, cuda_graph: str | None = "loop", backend: str = "fused",
               quantize: str | None = None, cfg_interval: tuple | None = None, release_transformer: bool = False):
    """Wrap a diffusers pipeline (`DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`, `AceStepPipeline`,
    `FluxPipeline`, `StableDiffusion3Pipeline`) so that its denoising loop runs in ditengine; called exactly like
    the pipeline, which itself is unchanged.

    `dtype`: the compute dtype (default: the transformer's when it is bf16 or fp16; for an fp32 transformer bf16 on
    CUDA, fp32 on a CPU); `backend`: "fused" or "reference"; `quantize` ("int8", "fp8") and `cfg_interval` as in
    `FastSampler` (ACE-Step takes its interval per call, as its pipeline does: `cfg_interval_start` /
    `cfg_interval_end`). Every argument is checked here, not at the first call.

    Memory: the wrapper's model shares the transformer's tensors, and the fused path holds one derived copy of each
    weight at most (none on CUDA in the transformer's own dtype, except the concatenations q|k|v), built here once.
    `release_transformer=True` then frees the pipeline's own transformer weights (moved to the meta device) when only
    the accelerated pipeline will be called; calling the original pipeline afterwards raises a RuntimeError."""
    name = type(pipe).__name__
    if name not in _PIPELINES:
        raise TypeError(f"accelerate: expected a diffusers {', '.join(_PIPELINES)}, got {name}")
    return _PIPELINES[name](pipe, dtype=dtype, cuda_graph=cuda_graph, backend=backend, quantize=quantize,
                            cfg_interval=cfg_interval, release_transformer=release_transformer)
