"""The sampling loop: classifier-free guidance around a DiT, one scheduler step per denoising step."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .model import DiT, guide
from .schedulers import COL, Scheduler

BACKENDS = ("reference", "fused")
CUDA_GRAPH_MODES = (None, "step", "loop")


def check_inputs(model: DiT, noise: torch.Tensor, class_labels: torch.Tensor) -> None:
    """Clear errors for the inputs of a sampling run (one host sync for the label range, before the loop)."""
    cfg = model.config
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or tuple(noise.shape[1:]) != expected:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected shape (B, {', '.join(map(str, expected))}) for this model, got {shape}")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise: expected a floating-point tensor, got {noise.dtype}")
    if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (noise.shape[0],):
        shape = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
        raise ValueError(f"class_labels: expected shape ({noise.shape[0]},) to match the noise batch, got {shape}")
    if class_labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"class_labels: expected an int64 or int32 tensor, got {class_labels.dtype}")
    if class_labels.device != noise.device:
        raise ValueError(f"class_labels: on {class_labels.device}, expected the noise's device {noise.device}")
    device = next(model.parameters()).device
    if device != noise.device:
        raise ValueError(f"noise: on {noise.device}, expected the model's device {device}")
    if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) >= cfg.num_classes):
        raise ValueError(f"class_labels: values must lie in [0, {cfg.num_classes}), got "
                         f"[{int(class_labels.min())}, {int(class_labels.max())}]")


def draw_noise(sched: Scheduler, i: int, like: torch.Tensor, generator: torch.Generator | None):
    """The step's noise, drawn in float32 from the user's generator: both backends consume it identically."""
    if not sched.needs_noise[i]:
        return None
    device = generator.device if generator is not None else like.device  # e.g. a CPU generator for CUDA
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def guided_labels(class_labels: torch.Tensor, num_classes: int, use_cfg: bool) -> torch.Tensor:
    if not use_cfg:
        return class_labels.long()
    return torch.cat([class_labels.long(), torch.full_like(class_labels.long(), num_classes)])  # (2B,)


def denoise_step(model: DiT, sched: Scheduler, i: int, x: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                 guided_channels: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One reference step: the model on the (CFG-doubled when `y` is twice the batch) scaled input, guidance,
    then `sched.step`. x (B, C, H, W) fp32 -> x_next."""
    x_in = x * sched.table[i, COL["c_in"]]
    use_cfg = len(y) == 2 * len(x)
    if use_cfg:
        x_in = torch.cat([x_in, x_in])
    out = model(x_in.to(next(model.parameters()).dtype), sched.timesteps[i].expand(len(x_in)), y).float()
    if use_cfg:
        out = guide(out, cfg_scale, guided_channels)[: len(x)]
    return sched.step(i, x, out, noise=noise)


@torch.no_grad()
def sample(model: DiT, sched: Scheduler, noise: torch.Tensor, class_labels: torch.Tensor, cfg_scale: float = 4.0,
           backend: str = "reference", cuda_graph: str | None = None, generator: torch.Generator | None = None,
           progress: bool = True, guided_channels: int | None = None) -> torch.Tensor:
    """Generate latents from `noise` (B, C, H, W) ~ N(0, I) for `class_labels` (B,).

    Guidance is on when `cfg_scale != 1`: the batch is doubled with the null label and the first
    `guided_channels` prediction channels are guided (default: all). Noise for stochastic samplers comes
    from `generator`. `backend="fused"` runs the fast path (`FastSampler`); `cuda_graph` applies to it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if cuda_graph not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph={cuda_graph!r}: expected one of {CUDA_GRAPH_MODES}")
    if backend == "fused":
        from .fast import FastSampler
        sampler = FastSampler(model, sched, cfg_scale=cfg_scale, dtype=next(model.parameters()).dtype,
                              cuda_graph=cuda_graph, guided_channels=guided_channels)
        return sampler(noise, class_labels, generator=generator, progress=progress)
    if cuda_graph is not None:
        raise ValueError("cuda_graph needs backend='fused'")
    check_inputs(model, noise, class_labels)
    cfg = model.config
    use_cfg = cfg_scale != 1.0
    k = cfg.in_channels if guided_channels is None else guided_channels
    sched.to(noise.device).reset()
    y = guided_labels(class_labels, cfg.num_classes, use_cfg)
    x = noise.float() * sched.init_noise_sigma  # (B, C, H, W), the sampler's state stays fp32
    for i in tqdm(range(len(sched)), desc="sampling", disable=not progress, leave=False):
        x = denoise_step(model, sched, i, x, y, cfg_scale, k, draw_noise(sched, i, x, generator))
    return x

