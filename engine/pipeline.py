"""`ditengine.accelerate(pipe)`: a diffusers pipeline whose denoising loop runs in ditengine.

Served: `DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`. The wrapper is called exactly like the
pipeline and returns what it returns; the pipeline's own text encoder (once per call, outside the loop),
VAE and image processing are used as they are, its scheduler is converted (`schedulers.from_diffusers`)
and its transformer converted once (`from_diffusers`). `backend="fused"` (the default) samples through
`FastSampler`; `backend="reference"` through ditengine's reference loop (`ditengine.sample`).
"""
from __future__ import annotations

import torch

from .checkpoints import from_diffusers
from .fast import FastSampler
from .sampling import sample
from .schedulers import DDIM, from_diffusers as scheduler_from_diffusers

BACKENDS = ("fused", "reference")


class _Accelerated:
    """What every accelerated pipeline shares: the converted model, scheduler conversion and the loop."""

    def __init__(self, pipe, dtype: torch.dtype | None, cuda_graph: str | None, backend: str,
                 quantize: str | None = None, cfg_interval: tuple | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if quantize is not None and backend != "fused":
            raise ValueError(f"quantize={quantize!r} needs backend='fused'")
        self.pipe, self.backend, self.cuda_graph = pipe, backend, cuda_graph
        self.quantize, self.cfg_interval = quantize, cfg_interval
        self.device = pipe._execution_device
        self.model = from_diffusers(pipe.transformer).to(self.device).eval()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if backend == "reference":
            self.model = self.model.to(self.dtype)
        self._samplers: dict[tuple, FastSampler] = {}

    def scheduler(self, num_inference_steps: int, **overrides):
        return scheduler_from_diffusers(self.pipe.scheduler, num_inference_steps, **overrides)

    def denoise(self, noise: torch.Tensor, num_inference_steps: int, guidance_scale: float, generator,
                scheduler_overrides: dict, *conditioning, **named) -> torch.Tensor:
        """The loop on `noise` (unscaled N(0, I) draws), on the chosen backend; fp32 latents."""
        if self.backend == "reference":
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            return sample(self.model, sched, noise.float(), *conditioning, cfg_scale=guidance_scale,
                          generator=generator, progress=False, cfg_interval=self.cfg_interval, **named)
        key = (num_inference_steps, guidance_scale, tuple(sorted(scheduler_overrides.items())))
        if key not in self._samplers:
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            self._samplers[key] = FastSampler(self.model, sched, cfg_scale=guidance_scale, dtype=self.dtype,
                                              cuda_graph=self.cuda_graph, quantize=self.quantize,
                                              cfg_interval=self.cfg_interval)
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


_PIPELINES = {"DiTPipeline": AcceleratedDiTPipeline, "PixArtAlphaPipeline": AcceleratedPixArtPipeline,
              "PixArtSigmaPipeline": AcceleratedPixArtPipeline}


def accelerate(pipe, dtype: torch.dtype | None = None, cuda_graph: str | None = "loop", backend: str = "fused",
               quantize: str | None = None, cfg_interval: tuple | None = None):
    """Wrap a diffusers pipeline (`DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`) so that its
    denoising loop runs in ditengine; called exactly like the pipeline, which itself is unchanged.
    `dtype`: the compute dtype (default bf16 on CUDA, fp32 on a CPU); `backend`: "fused" or "reference";
    `quantize` ("int8", "fp8") and `cfg_interval` as in `FastSampler`."""
    name = type(pipe).__name__
    if name not in _PIPELINES:
        raise TypeError(f"accelerate: expected a diffusers {', '.join(_PIPELINES)}, got {name}")
    return _PIPELINES[name](pipe, dtype=dtype, cuda_graph=cuda_graph, backend=backend, quantize=quantize,
                            cfg_interval=cfg_interval)
