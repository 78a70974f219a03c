"""The class-conditional DiT: `DiTPipeline` accelerated, the reference loop's call of the model, and its family
record (facebookresearch/DiT and diffusers checkpoints, the reference step cache, the runtime peers' ladder)."""
from __future__ import annotations

import functools

import torch

from .. import families
from ..cache import Stages
from ..configs import DiTConfig
from ..fast.dit import FastDiT
from ..inputs import check_inputs, guided_labels
from ..models import dit_checkpoints
from ..models.dit import DiT
from .base import Accelerated, check_call


def dit_forward(model, spec: DiT, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named):
    """The DiT on the CFG-doubled class labels (the null label the unconditional half), checked once."""
    (class_labels,) = conditioning or (named.pop("class_labels"),)
    check_inputs(spec, noise, class_labels)
    y = guided_labels(class_labels, spec.config.num_classes, use_cfg)
    if cache is not None:
        return lambda x_in, t, step: cache(dit_stages(spec, x_in, t, y[:len(x_in)]), step)
    return lambda x_in, t, step: model(x_in, t, y[:len(x_in)])


def dit_stages(spec: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Stages:
    """`DiT.forward` cut for a step cache."""
    c = spec.conditioning(t, y)  # (B, D)
    return Stages(spec.x_embedder(x) + spec.pos_embed.to(x.dtype), [functools.partial(b, c=c) for b in spec.blocks],
                  lambda h: spec.unpatchify(spec.final_layer(h, c)), [[b.attn, b.mlp] for b in spec.blocks], spec)


class AcceleratedDiTPipeline(Accelerated):
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
        check_call(num_inference_steps, guidance_scale)
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


families.register(families.Family(
    name="dit", spec=DiT, config=DiTConfig, fast=FastDiT, forward=dit_forward,
    channels=lambda cfg: cfg.in_channels, depth=lambda model: model.config.depth,
    diffusers_class="DiTTransformer2DModel", from_diffusers=dit_checkpoints.from_diffusers,
    recognises=lambda state: True, catch_all=True,  # asked last: its loader names what is missing
    load=dit_checkpoints.load, pipelines={"DiTPipeline": AcceleratedDiTPipeline},
    reference_cache=True,
    bench=(lambda name: name.upper().startswith("DIT"), "ditengine.bench.dit:dit_setup"), bench_peers=True))
