"""The class-conditional DiT workload of `ditengine-bench --model DiT-S/2` (any DiT config name): a random DiT at
the named size, DDIM with trailing spacing, random class labels; the eager rows are ditengine's reference (with
SDPA or its own attention), and the CPU runtime peers export it."""
from __future__ import annotations

import copy

import torch

import ditengine as de
from ditengine.inputs import guided_labels
from ditengine.sampling import reference_forward

from .peers import PeerGraph
from .workload import Workload


def dit_flops(cfg: de.DiTConfig, batch: int) -> float:
    """FLOPs of one forward on `batch` samples: the GEMMs and attention (2 FLOPs per multiply-add)."""
    T, D, H = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * T * (3 * D * D + D * D + 2 * D * H) + 4 * T * T * D + 2 * 6 * D * D
    patch = 2 * T * D * cfg.in_channels * cfg.patch_size**2
    final = 2 * T * D * cfg.patch_size**2 * cfg.out_channels + 2 * 2 * D * D
    return batch * (cfg.depth * per_block + patch + final)


def dit_peer_graph(model: de.DiT, labels: torch.Tensor, use_cfg: bool) -> PeerGraph:
    """The reference DiT for the runtime peers: model(x, t, y) with the CFG batch's labels (the null label last)."""
    # torch's exporter decomposes SDPA into matmul + softmax anyway; the explicit form does it with fewer reshapes
    # and scalings.
    module = copy.deepcopy(model).float().eval().use_sdpa(False)
    return PeerGraph(module, {"y": guided_labels(labels, model.config.num_classes, use_cfg)})


def dit_workload(base, sched, noise, labels) -> Workload:
    def eager_model(dtype, sdpa):
        return copy.deepcopy(base).to(dtype).use_sdpa(sdpa)

    return Workload(base, sched, noise, (labels,), eager_model=eager_model,
                    eager_forward=lambda model, use_cfg: reference_forward(model, noise, use_cfg, labels),
                    peer_graph=lambda use_cfg: dit_peer_graph(base, labels, use_cfg))


def dit_setup(args, device):
    """(config, fp32 reference model, FLOPs of one forward per model batch, workload per batch) for a DiT."""
    input_size = args.image_size // 8 if args.image_size else (args.input_size or 32)
    overrides = {"input_size": input_size} | ({"depth": args.depth} if args.depth else {})
    cfg = de.DiTConfig.from_name(args.model, **overrides)
    torch.manual_seed(args.seed)
    base = de.DiT(cfg).eval().to(device)
    sched = de.schedulers.DDIM(args.steps, timestep_spacing="trailing", clip_sample=False).to(device)

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.in_channels, input_size, input_size, device=device, generator=g)
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=g)
        return dit_workload(base, sched, noise, labels)

    return cfg, base, lambda model_batch: dit_flops(cfg, model_batch), workload
