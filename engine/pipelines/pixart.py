"""PixArt-alpha and PixArt-sigma: `PixArtAlphaPipeline` / `PixArtSigmaPipeline` accelerated, the reference loop's
call of the model (the negative prompt the unconditional half), and the family record (diffusers and original
checkpoints, which need the config)."""
from __future__ import annotations

import functools

import torch

from .. import families
from ..cache import Stages
from ..fast.pixart import FastPixArt
from ..inputs import check_patch_grid_noise
from ..models import pixart_checkpoints as pixart
from ..models.pixart import PixArt, PixArtConfig, encoder_mask_bias
from ..sampling import doubled
from ..schedulers import DDIM
from .base import Accelerated, check_call


def pixart_forward(model, spec: PixArt, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named):
    """PixArt as its pipelines call it: `prompt_embeds`, `prompt_attention_mask`, `negative_prompt_embeds`,
    `negative_prompt_attention_mask`, `added_cond_kwargs` (diffusers' names), the negative prompt the unconditional
    half."""
    check_patch_grid_noise(noise, spec.config.in_channels, spec.config.patch_size, next(model.parameters()).device)
    if use_cfg and named.get("negative_prompt_embeds") is None:
        raise ValueError("negative_prompt_embeds: required with guidance (cfg_scale != 1)")
    text = doubled(named.get("prompt_embeds"), named.get("negative_prompt_embeds"), use_cfg)
    mask = named.get("prompt_attention_mask")
    if mask is not None and use_cfg:
        neg = named.get("negative_prompt_attention_mask")
        mask = torch.cat([mask, torch.ones_like(mask) if neg is None else neg])
    added = named.get("added_cond_kwargs")
    if added is not None:
        added = {k: None if v is None else doubled(v, v, use_cfg) for k, v in added.items()}
    dtype = next(model.parameters()).dtype
    text = None if text is None else text.to(dtype)

    def forward(x_in, t, step):
        n = len(x_in)
        if cache is not None:
            return cache(pixart_stages(spec, x_in, text[:n], t, None if mask is None else mask[:n],
                                       None if added is None else {k: None if v is None else v[:n]
                                                                   for k, v in added.items()}), step)
        return model(x_in, encoder_hidden_states=None if text is None else text[:n], timestep=t,
                     encoder_attention_mask=None if mask is None else mask[:n],
                     added_cond_kwargs=None if added is None else
                     {k: None if v is None else v[:n] for k, v in added.items()})

    return forward


def pixart_stages(spec: PixArt, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask,
                  added_cond_kwargs) -> Stages:
    """`PixArt.forward` cut for a step cache."""
    p = spec.config.patch_size
    grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    bias = encoder_mask_bias(encoder_attention_mask, hidden_states.dtype)  # (B, 1, 1, L) or None
    x = spec.embed(hidden_states)  # (B, T, D)
    emb, t6 = spec.timestep_conditioning(timestep, added_cond_kwargs, hidden_states.shape[0])
    context = spec.caption(encoder_hidden_states)  # (B, L, D)
    return Stages(x, [functools.partial(spec.block, i, t6=t6, context=context, bias=bias)
                      for i in range(len(spec.blocks))],
                  lambda x: spec.unembed(x, emb, grid), [[b.attn, b.cross_attn, b.mlp] for b in spec.blocks], spec)


def recognises(state: dict) -> bool:
    """A diffusers PixArtTransformer2DModel's keys, or the original PixArt-alpha / sigma checkpoint's."""
    return any(k.startswith("adaln_single.") for k in state) or \
        any(k.startswith("t_block.") for k in state) and any(".cross_attn." in k for k in state)


def load(state: dict, dconfig: dict, options: dict) -> PixArt:
    """Shapes do not give the head count or the position-embedding scale: the config is the folder's config.json or
    `pixart_config=` (a diffusers config dict or a PixArtConfig)."""
    original = not any(k.startswith("adaln_single.") for k in state)
    config = options.get("pixart_config") or dconfig
    if not config:
        kind = "an original PixArt" if original else "a diffusers PixArtTransformer2DModel"
        raise ValueError(f"checkpoint: {kind} state dict needs its config: pass pixart_config= (the diffusers "
                         "config dict; shapes do not give the head count or the position-embedding scale)")
    if not original:
        return pixart.load_diffusers_state_dict(state, config)
    return pixart.load_original_state_dict(state, pixart.PixArtConfig.from_diffusers(config)
                                           if isinstance(config, dict) else config)


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


class AcceleratedPixArtPipeline(Accelerated):
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
        check_call(num_inference_steps, guidance_scale)
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


families.register(families.Family(
    name="pixart", spec=PixArt, config=PixArtConfig, fast=FastPixArt, forward=pixart_forward, reference_cache=True,
    channels=lambda cfg: cfg.in_channels, depth=lambda model: len(model.blocks),
    diffusers_class="PixArtTransformer2DModel", from_diffusers=pixart.from_diffusers, recognises=recognises,
    load=load, pipelines={"PixArtAlphaPipeline": AcceleratedPixArtPipeline,
                          "PixArtSigmaPipeline": AcceleratedPixArtPipeline},
    bench=(lambda name: name.lower().startswith("pixart"), "ditengine.bench.pixart:pixart_setup"), bench_peers=True))
