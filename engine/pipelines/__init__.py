"""`ditengine.accelerate(pipe)` and the accelerated diffusers pipelines, one file per family (each also registers
its family: see `ditengine.families`). Served: `DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`,
`AceStepPipeline` (ACE-Step 1.5 music), `FluxPipeline` (Flux.1 dev and schnell), `StableDiffusion3Pipeline` (SD3,
SD3.5). A wrapper is called exactly like its pipeline and returns what it returns: the pipeline's own text
encoders (once per call, outside the loop), VAE and image processing are used as they are, its scheduler is
converted (`schedulers.from_diffusers`) and its transformer shared (`from_diffusers`). `backend="fused"` (the
default) samples through `FastSampler`; `backend="reference"` through ditengine's reference loop
(`ditengine.sample`).

The imports below are the registration order: the order in which the families are listed (in messages, the
exports) and asked to recognise a checkpoint.
"""
from .base import BACKENDS, Accelerated, accelerate, release_weights
from .dit import AcceleratedDiTPipeline  # noqa: I001 (registration order)
from .pixart import AcceleratedPixArtPipeline
from .ace_step import AcceleratedAceStepPipeline
from .flux import AcceleratedFluxPipeline
from .sd3 import AcceleratedSD3Pipeline
from .wan import wan_forward  # noqa: F401 (registers the family)

__all__ = ["BACKENDS", "Accelerated", "AcceleratedAceStepPipeline", "AcceleratedDiTPipeline",
           "AcceleratedFluxPipeline", "AcceleratedPixArtPipeline", "AcceleratedSD3Pipeline", "accelerate",
           "release_weights"]
