"""ditengine: fast, verified sampling from diffusion transformers (DiT)."""
from . import guidance, schedulers
from .checkpoints import from_diffusers, load_checkpoint
from .configs import DiTConfig
from .fast import FastAceStep, FastDiT, FastPixArt, FastSampler
from .generate import load_pretrained
from .guidance import APG
from .models import AceStep, AceStepConfig, DiT, Flux, FluxConfig, PixArt, PixArtConfig, SD3, SD3Config
from .pipeline import accelerate
from .sampling import sample

__version__ = "0.1.0"

__all__ = ["APG", "AceStep", "AceStepConfig", "DiT", "DiTConfig", "FastAceStep", "FastDiT", "FastPixArt",
           "FastSampler", "Flux", "FluxConfig", "PixArt", "PixArtConfig", "SD3", "SD3Config", "accelerate", "from_diffusers", "guidance",
           "load_checkpoint", "load_pretrained", "sample", "schedulers", "__version__"]
