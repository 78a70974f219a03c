"""ditengine: fast, verified sampling from diffusion transformers (DiT)."""
from . import schedulers
from .checkpoints import from_diffusers, load_checkpoint
from .configs import DiTConfig
from .fast import FastDiT, FastPixArt, FastSampler
from .generate import load_pretrained
from .models import DiT, PixArt, PixArtConfig
from .pipeline import accelerate
from .sampling import sample

__version__ = "0.1.0"

__all__ = ["DiT", "DiTConfig", "FastDiT", "FastPixArt", "FastSampler", "PixArt", "PixArtConfig", "accelerate",
           "from_diffusers", "load_checkpoint", "load_pretrained", "sample", "schedulers", "__version__"]
