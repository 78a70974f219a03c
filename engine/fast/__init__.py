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
from .ace_step import FastAceStep
from .base import DTYPES, FusedDenoiser, cublaslt_gelu_is_tanh
from .dit import FastDiT
from .flux import FastFlux
from .pixart import FastPixArt
from .sampler import CACHE_DECISIONS, FastSampler, decision_mode, fused_denoiser
from .sd3 import FastSD3


def __getattr__(name: str):
    if name == "FAMILIES":  # which fused denoiser serves which reference model: now the family registry's
        from .. import families

        return [(f.spec, f.fast) for f in families.families()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CACHE_DECISIONS", "DTYPES", "FastAceStep", "FastDiT", "FastFlux", "FastPixArt", "FastSD3", "FastSampler",
           "FusedDenoiser", "cublaslt_gelu_is_tanh", "decision_mode", "fused_denoiser"]
