"""The reference specs, one file a family, each a readable model in plain PyTorch that the fast path reads
its weights from: `dit.py` (class-conditional DiT, facebookresearch/DiT's names), `pixart.py` (PixArt-alpha
and PixArt-sigma, the original PixArt names, with their diffusers conversion), `ace_step.py` (ACE-Step 1.5's music
DiT, diffusers' names, with the original checkpoint's conversion), `flux.py` (Flux.1 dev / schnell, diffusers'
names, with BFL's checkpoint conversion), `sd3.py` (SD3 / SD3.5's MMDiT, diffusers' names, with SAI's checkpoint
conversion)."""
from .ace_step import AceStep, AceStepConfig
from .dit import DiT
from .flux import Flux, FluxConfig
from .pixart import PixArt, PixArtConfig
from .sd3 import SD3, SD3Config

__all__ = ["AceStep", "AceStepConfig", "DiT", "Flux", "FluxConfig", "PixArt", "PixArtConfig", "SD3", "SD3Config"]
