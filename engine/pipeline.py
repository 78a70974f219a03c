"""`ditengine.accelerate(pipe)`: a diffusers `DiTPipeline` that samples through `FastSampler`."""
from __future__ import annotations

import torch

from .checkpoints import from_diffusers
from .fast import FastSampler
from .schedulers import from_diffusers as scheduler_from_diffusers


class AcceleratedDiTPipeline:
    """Called like `DiTPipeline`: the same latents from the same generator, the pipeline's own scheduler
    (converted by `schedulers.from_diffusers`) and VAE; the denoising loop runs in `FastSampler`.

    For deterministic schedulers (DDIM with eta = 0, Euler, DPM-Solver++) the images equal the
    pipeline's within the compute dtype's tolerance. Stochastic ones draw their step noise for the batch
    rather than for the CFG-doubled batch as diffusers does, so they sample the same distribution with
    other draws. Two documented differences: the initial noise is scaled by the scheduler's
    `init_noise_sigma` (DiTPipeline omits it, which only matters for Euler), and DDIM with non-uniform
    spacing steps between scheduled timesteps (see `schedulers.DDIM`).
    """

    def __init__(self, pipe, dtype: torch.dtype | None = None, cuda_graph: str | None = "loop"):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.model = from_diffusers(pipe.transformer).to(self.device).eval()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.cuda_graph = cuda_graph
        self._samplers: dict[tuple, FastSampler] = {}

    def sampler(self, num_inference_steps: int, guidance_scale: float, **scheduler_overrides) -> FastSampler:
        key = (num_inference_steps, guidance_scale, tuple(sorted(scheduler_overrides.items())))
        if key not in self._samplers:
            sched = scheduler_from_diffusers(self.pipe.scheduler, num_inference_steps, **scheduler_overrides)
            self._samplers[key] = FastSampler(self.model, sched, cfg_scale=guidance_scale, dtype=self.dtype,
                                              cuda_graph=self.cuda_graph)
        return self._samplers[key]

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
        sampler = self.sampler(num_inference_steps, scale, **scheduler_overrides)
        latents = sampler(latents.float(), labels, generator=generator)
        latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        samples = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            samples = pipe.numpy_to_pil(samples)
        return ImagePipelineOutput(images=samples) if return_dict else (samples,)


def accelerate(pipe, dtype: torch.dtype | None = None, cuda_graph: str | None = "loop") -> AcceleratedDiTPipeline:
    """Wrap a diffusers `DiTPipeline` so it samples through `FastSampler`; the pipeline itself is unchanged."""
    return AcceleratedDiTPipeline(pipe, dtype=dtype, cuda_graph=cuda_graph)
