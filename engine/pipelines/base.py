"""What every accelerated pipeline shares, and `accelerate(pipe)`, which picks the wrapper of the pipeline's family
from the registry. Each family's wrapper, the call of its transformer the reference loop makes, and its registry
record are in this package's file of that family."""
from __future__ import annotations

import functools
import logging
import math
import numbers
from collections import OrderedDict

import torch

from .. import families
from ..checkpoints import from_diffusers
from ..experts import Expert
from ..fast import DTYPES, FastSampler, fused_denoiser
from ..fast.base import QUANTIZE
from ..guidance import APG
from ..inputs import check_cfg_scale
from ..lora import LoraSync
from ..sampling import CUDA_GRAPH_MODES, sample
from ..schedulers import from_diffusers as scheduler_from_diffusers

BACKENDS = ("fused", "reference")
log = logging.getLogger("ditengine")


def check_call(num_inference_steps, guidance_scale) -> None:
    """The arguments every accelerated pipeline takes, checked first in a call (before any encoder runs): a NaN
    guidance scale would otherwise fail every `> 1` test and run unguided, and zero steps divide by zero."""
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, numbers.Integral) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
    check_cfg_scale(guidance_scale, "guidance_scale")


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


class Accelerated:
    """What every accelerated pipeline shares: the model (sharing the pipeline transformer's tensors), its fused
    denoiser built once (one derived copy of the weights, shared by the samplers of every step count and guidance
    scale), scheduler conversion and the loop."""

    def __init__(self, pipe, dtype: torch.dtype | None, cuda_graph: str | None, backend: str,
                 quantize: str | None = None, cfg_interval: tuple | None = None, release_transformer: bool = False,
                 pool_size: int = 8, parallel=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
        if quantize is not None and backend != "fused":
            raise ValueError(f"quantize={quantize!r} needs backend='fused'")
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph={cuda_graph!r}: expected one of {CUDA_GRAPH_MODES}")
        if dtype is not None and dtype not in DTYPES:
            raise TypeError(f"dtype: expected None or one of {[str(d) for d in DTYPES]}, got {dtype!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size: expected an int >= 1 (the plans kept: shapes x settings), got {pool_size!r}")
        if release_transformer and backend != "fused":
            raise ValueError("release_transformer=True needs backend='fused' (the reference loop runs the "
                             "transformer's own weights)")
        self.pipe, self.backend, self.cuda_graph = pipe, backend, cuda_graph
        self.quantize, self.cfg_interval, self.parallel = quantize, cfg_interval, parallel
        if parallel is not None and backend != "fused":
            raise ValueError("parallel needs backend='fused' (the reference loop runs on one device)")
        self.device = pipe._execution_device
        # Shares the transformer's tensors; a peft LoRA's base weights, its adapters folded in by `self.lora`.
        self.model = from_diffusers(pipe.transformer, peft_base=True).to(self.device).eval()
        own = pipe.transformer.dtype
        self.dtype = dtype or (own if own != torch.float32 else
                               torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.fast = None
        if backend == "reference":
            self.model = self.model.to(self.dtype)  # a copy only when the pipeline runs another dtype
        else:
            self.fast = fused_denoiser(self.model, self.dtype, quantize=quantize)
        self._samplers: dict[tuple, FastSampler] = {}
        # The plans (static buffers, captured graphs) of every sampler, least recently used first: at most
        # `pool_size`, so a server changing resolution or settings per request holds a bounded set of them.
        self.pool_size, self._pool = pool_size, OrderedDict()
        self.lora = LoraSync(pipe.transformer, self.model, self.fast)
        self.lora.sync()
        if release_transformer:
            release_weights(pipe.transformer, self.model)

    def scheduler(self, num_inference_steps: int, **overrides):
        return scheduler_from_diffusers(self.pipe.scheduler, num_inference_steps, **overrides)

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The call's image size, the pipeline's default where not given."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return height or default, width or default

    def strength_schedule(self, steps: int, strength: float, num_inference_steps: int, sigmas=None,
                          **set_timesteps) -> tuple[torch.Tensor, int]:
        """The pipeline's scheduler set as its loop sets it (`sigmas`, or `steps`; and mu), then cut by `strength` with
        the pipeline's own `get_timesteps`, for its `prepare_latents` to noise the image latents to the first step
        left: (the timesteps left, how many). None left raises a ValueError naming strength."""
        scheduler = self.pipe.scheduler
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **set_timesteps)
        else:
            scheduler.set_timesteps(steps, device=self.device, **set_timesteps)
        timesteps, left = self.pipe.get_timesteps(steps, strength, self.device)
        if left < 1:
            raise ValueError(f"strength={strength}: with num_inference_steps={num_inference_steps} it leaves {left} "
                             "steps to run; raise either")
        return timesteps, left

    def denoise(self, noise: torch.Tensor, num_inference_steps: int, guidance_scale: float, generator,
                scheduler_overrides: dict, *conditioning, cfg_interval: tuple | None = None,
                guider: APG | None = None, lora_scale: float = 1.0, callback=None, expert: Expert | None = None,
                expert_denoiser=None, **named) -> torch.Tensor:
        """The loop on `noise` (unscaled N(0, I) draws), on the chosen backend; fp32 latents. `cfg_interval`
        (default: the wrapper's) and the `guider` are the call's when its pipeline takes them per call;
        `lora_scale` scales the transformer's LoRA adapters (its pipeline's `joint_attention_kwargs["scale"]`);
        `callback(i, t, x)` runs after each step (`step_callback`): with it the whole-loop graph falls back to
        per-step graphs. `expert` (with its fused denoiser `expert_denoiser`): the second model of the low-noise
        steps."""
        if not self.lora.sync(lora_scale):
            log.info("ditengine: a LoRA layer's weights became copies of the transformer's; the loop's graphs are "
                     "captured again")
            self._samplers.clear()
            self._pool.clear()
        cfg_interval = cfg_interval or self.cfg_interval
        if self.backend == "reference":
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            return sample(self.model, sched, noise.float(), *conditioning, cfg_scale=guidance_scale,
                          generator=generator, progress=False, cfg_interval=cfg_interval, guider=guider,
                          callback=callback, expert=expert, **named)
        graphs = self.cuda_graph
        if callback is not None and graphs == "loop":
            graphs = "step"
            log_once("ditengine: a step callback runs between steps: the whole-loop graph falls back to step graphs")
        key = (num_inference_steps, guidance_scale, tuple(sorted(scheduler_overrides.items())), cfg_interval, guider,
               graphs, None if expert is None else (expert.boundary, expert.cfg_scale))
        if key not in self._samplers:
            sched = self.scheduler(num_inference_steps, **scheduler_overrides)
            self._samplers[key] = FastSampler(self.model, sched, cfg_scale=guidance_scale, dtype=self.dtype,
                                              cuda_graph=graphs, quantize=self.quantize,
                                              cfg_interval=cfg_interval, guider=guider, denoiser=self.fast,
                                              expert=expert, expert_denoiser=expert_denoiser, parallel=self.parallel)
        sampler = self._samplers[key]
        out = sampler(noise.float(), *conditioning, generator=generator, callback=callback, **named)
        self._keep(key, sampler)
        return out

    def _keep(self, key: tuple, sampler: FastSampler) -> None:
        """Mark the plan the call ran as the most recent; drop the least recent past `pool_size` (and a sampler left
        with none)."""
        if sampler.last_plan is None:  # an empty batch builds no plan
            return
        self._pool[(key, sampler.last_plan)] = None
        self._pool.move_to_end((key, sampler.last_plan))
        while len(self._pool) > self.pool_size:
            (old_key, old_plan), _ = self._pool.popitem(last=False)
            old = self._samplers[old_key]
            old.drop_plan(old_plan)
            if not old._plans:
                del self._samplers[old_key]


def lora_scale(attention_kwargs: dict | None, name: str = "joint_attention_kwargs") -> float:
    """The LoRA scale of a pipeline's `joint_attention_kwargs` (or `attention_kwargs`): "scale" is the one key the
    accelerated loop serves (it scales every LoRA adapter of the transformer, as diffusers' transformers do)."""
    kwargs = dict(attention_kwargs or {})
    scale = kwargs.pop("scale", 1.0)
    if kwargs:
        raise ValueError(f"{name}: only 'scale' (the LoRA scale) is served by the accelerated pipeline, got "
                         f"{sorted(kwargs)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{name}['scale']: expected a finite number (the LoRA scale), got {scale!r}")
    return float(scale)


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    log.info(message)


def step_callback(pipe, callback_on_step_end, tensor_inputs, state: dict, to_pipeline, from_pipeline, blend=None):
    """diffusers' `callback_on_step_end(pipe, i, t, {name: tensor})` as the loop's `callback(i, t, x)` (None without
    one, nor a `blend`): `to_pipeline(x)` makes the pipeline's latents from the loop's state (its layout and dtype)
    and `from_pipeline` takes latents back into the loop; the other tensors it asks for (`state`, e.g. the prompt
    embeddings) are passed as they are and cannot be replaced. `pipe._interrupt` is not served. `blend(i, latents)`,
    an inpainting pipeline's step-end mix of the denoised and the (noised) original latents, runs first, as the
    pipeline runs it before its callback."""
    if callback_on_step_end is None and blend is None:
        return None
    if callback_on_step_end is not None:
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs

    def callback(i, t, x):
        latents = to_pipeline(x)
        if blend is not None:
            latents = blend(i, latents)
        if callback_on_step_end is None:
            return from_pipeline(latents)
        given = {name: latents if name == "latents" else state[name] for name in tensor_inputs}
        pipe._current_timestep = t
        out = callback_on_step_end(pipe, i, t, given) or {}
        for name, value in out.items():
            if name != "latents" and value is not state.get(name):
                raise ValueError(f"callback_on_step_end: returned a new {name!r}; the accelerated loop takes back the "
                                 "latents only")
        if getattr(pipe, "_interrupt", False):
            raise ValueError("callback_on_step_end: set the pipeline's interrupt flag, which the accelerated loop "
                             "does not serve (it runs every step); call the pipeline itself for it")
        new = out.get("latents", latents)
        return None if new is latents and blend is None else from_pipeline(new)

    return callback


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A preprocessed mask (M, 1, H, W) for preprocessed images (N, 3, H, W): one mask for all, or one per image
    (the pipelines would otherwise fail deep in a broadcast)."""
    if mask.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"mask_image: expected one mask or one per image ({images.shape[0]}), got {mask.shape[0]}")
    return mask


def inpaint_blend(scheduler, begin: int, steps: int, image_latents: torch.Tensor, noise: torch.Tensor,
                  mask: torch.Tensor):
    """Inpainting's step-end mix as the flow-match pipelines run it after step i of the `steps` they run: where the
    mask is 0 the original latents noised to the next step's sigma (the pipeline scheduler's own `sigmas`, its schedule
    set; the original itself after the last step), where it is 1 the denoised latents. All in the pipeline's layout."""
    sigmas = scheduler.sigmas

    def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
        proper = image_latents
        if i < steps - 1:
            sigma = sigmas[begin + i + 1].to(noise.device)
            proper = sigma * noise + (1.0 - sigma) * image_latents
        return (1 - mask) * proper + mask * latents

    return blend


def refuse_unsupported(generator, **unsupported) -> None:
    """The MMDiT pipelines' arguments the accelerated loop does not take: a ValueError naming the first one given,
    or a list of generators."""
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"{name}: not supported by the accelerated pipeline; call the pipeline itself for it")
    if isinstance(generator, list):
        raise ValueError("generator: pass one torch.Generator (a list per image is not supported)")


def accelerate(pipe, dtype: torch.dtype | None = None, cuda_graph: str | None = "loop", backend: str = "fused",
               quantize: str | None = None, cfg_interval: tuple | None = None, release_transformer: bool = False,
               pool_size: int = 8, parallel=None):
    """Wrap a diffusers pipeline (`DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`, `AceStepPipeline`,
    `FluxPipeline`, `FluxImg2ImgPipeline`, `FluxInpaintPipeline`, `FluxFillPipeline`, `FluxControlPipeline`,
    `FluxKontextPipeline`, `StableDiffusion3Pipeline`, `StableDiffusion3Img2ImgPipeline`,
    `StableDiffusion3InpaintPipeline`) so that its denoising loop runs in ditengine; called exactly like the pipeline,
    which itself is unchanged. The transformer's LoRA adapters are served live (docs/lora.md).

    `dtype`: the compute dtype (default: the transformer's when it is bf16 or fp16; for an fp32 transformer bf16 on
    CUDA, fp32 on a CPU); `backend`: "fused" or "reference"; `quantize` ("int8", "fp8") and `cfg_interval` as in
    `FastSampler` (ACE-Step takes its interval per call, as its pipeline does: `cfg_interval_start` /
    `cfg_interval_end`). Every argument is checked here, not at the first call.

    Memory: the wrapper's model shares the transformer's tensors, and the fused path holds one derived copy of each
    weight at most (none on CUDA in the transformer's own dtype, except the concatenations q|k|v), built here once.
    `release_transformer=True` then frees the pipeline's own transformer weights (moved to the meta device) when only
    the accelerated pipeline will be called; calling the original pipeline afterwards raises a RuntimeError.

    `pool_size`: how many plans (a sampler's static buffers and captured graphs for one shape and set of settings:
    steps, guidance, resolution, batch) are kept, least recently used dropped first; a first call at a new shape
    plans (and on a GPU captures) again.

    `parallel`: a `ditengine.ParallelConfig`, the run over the ranks of a torch.distributed group (every rank builds
    the pipeline and calls the wrapper alike; each returns the same output): see `FastSampler`."""
    name = type(pipe).__name__
    found = families.of_pipeline(name)
    if found is None:
        served = [p for f in families.families() for p in f.pipelines]
        raise TypeError(f"accelerate: expected a diffusers {', '.join(served)}, got {name}")
    return found[1](pipe, dtype=dtype, cuda_graph=cuda_graph, backend=backend, quantize=quantize,
                            cfg_interval=cfg_interval, release_transformer=release_transformer, pool_size=pool_size,
                            parallel=parallel)
