"""ditengine: fast, verified sampling from diffusion transformers (DiT)."""
from . import schedulers
from .checkpoints import from_diffusers, load_checkpoint
from .configs import DiTConfig
from .model import DiT
from .sampling import sample

__version__ = "0.1.0"

__all__ = ["DiT", "DiTConfig", "from_diffusers", "load_checkpoint", "sample", "schedulers", "__version__"]
