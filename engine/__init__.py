"""ditengine: fast, verified sampling from diffusion transformers (DiT)."""
from . import cache, families, guidance, schedulers
from .checkpoints import from_diffusers, load_checkpoint
from .experts import Expert
from .fast import FastSampler
from .generate import load_pretrained  # the digits demo (ditengine.demo.generate), through its alias
from .guidance import APG
from .parallel import ParallelConfig
from .pipelines import accelerate
from .sampling import sample

__version__ = "0.1.0"

# Every registered family's reference spec, its config and its fused denoiser, by their class names (DiT, DiTConfig,
# FastDiT, Flux, FluxConfig, FastFlux, ...): the registry says which exist.
_FAMILY_NAMES = sorted({cls.__name__: cls for f in families.families() for cls in (f.spec, f.config, f.fast)
                        if cls is not None}.items())
globals().update(_FAMILY_NAMES)

__all__ = ["APG", "Expert", "FastSampler", "ParallelConfig", "accelerate", "cache", "families", "from_diffusers",
           "guidance", "load_checkpoint", "load_pretrained", "sample", "schedulers", "__version__"]
__all__ += [name for name, _ in _FAMILY_NAMES]
