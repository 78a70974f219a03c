"""The fast path: one fused denoiser per model family, and the one family-agnostic sampling loop.

| module | holds |
|---|---|
| `base.py` | what every fused denoiser shares (token GEMMs, backend choice) and the denoiser contract |
| `dit.py` | the class-conditional DiT's fused denoiser |
| `pixart.py` | PixArt-alpha / sigma's fused denoiser (cross-attention K/V precomputed per prompt) |
| `sampler.py` | `FastSampler`: static buffers, graph capture, step caching, the fused scheduler step |
"""
from ..models.dit import DiT
from ..models.pixart import PixArt
from .base import DTYPES, FusedDenoiser, cublaslt_gelu_is_tanh
from .dit import FastDiT
from .pixart import FastPixArt

# Which fused denoiser serves which reference model (FastSampler dispatches on it).
FAMILIES = [(DiT, FastDiT), (PixArt, FastPixArt)]

from .sampler import CACHE_DECISIONS, FastSampler, decision_mode, fused_denoiser  # noqa: E402

__all__ = ["CACHE_DECISIONS", "DTYPES", "FAMILIES", "FastDiT", "FastPixArt", "FastSampler", "FusedDenoiser",
           "cublaslt_gelu_is_tanh", "decision_mode", "fused_denoiser"]
