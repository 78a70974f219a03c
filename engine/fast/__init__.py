"""The fast path: one fused denoiser per model family, and the one family-agnostic sampling loop.

| module | holds |
|---|---|
| `base.py` | what every fused denoiser shares (token GEMMs, backend choice) and the denoiser contract |
| `dit.py` | the class-conditional DiT's fused denoiser |
| `pixart.py` | PixArt-alpha / sigma's fused denoiser (cross-attention K/V precomputed per prompt) |
| `flux.py` | Flux.1's fused denoiser (a joint [text; image] residual stream, every block's modulation precomputed) |
| `sd3.py` | SD3 / SD3.5's fused denoiser (a joint [image; text] residual stream, SD3.5's dual attention) |
| `ace_step.py` | ACE-Step 1.5's fused denoiser (GQA, RMSNorm forms, SwiGLU; the condition's K/V precomputed per call) |
| `sampler.py` | `FastSampler`: static buffers, graph capture, step caching, the fused scheduler step |
"""
from ..models.dit import DiT
from ..models.ace_step import AceStep
from ..models.flux import Flux
from ..models.pixart import PixArt
from ..models.sd3 import SD3
from .ace_step import FastAceStep
from .flux import FastFlux
from .base import DTYPES, FusedDenoiser, cublaslt_gelu_is_tanh
from .dit import FastDiT
from .pixart import FastPixArt
from .sd3 import FastSD3

# Which fused denoiser serves which reference model (FastSampler dispatches on it).
FAMILIES = [(DiT, FastDiT), (PixArt, FastPixArt), (AceStep, FastAceStep), (Flux, FastFlux), (SD3, FastSD3)]

from .sampler import CACHE_DECISIONS, FastSampler, decision_mode, fused_denoiser  # noqa: E402

__all__ = ["CACHE_DECISIONS", "DTYPES", "FAMILIES", "FastAceStep", "FastDiT", "FastFlux", "FastPixArt", "FastSD3", "FastSampler", "FusedDenoiser",
           "cublaslt_gelu_is_tanh", "decision_mode", "fused_denoiser"]
