"""The PixArt-alpha / PixArt-sigma workload of `ditengine-bench --model PixArt-Σ` (or `PixArt-α`).

At the models' real width (D 1152, 16 heads of 72, T5 captions of 4096 channels, 120 tokens for alpha and
300 for sigma, both padded as the pipelines pad them: a 20-token prompt and the 1-token negative ""), 28
layers on a GPU and 4 on a CPU by default (`--depth` sets it), 256 px unless `--image-size` says
otherwise. The eager rows are diffusers' own `PixArtTransformer2DModel` (its weights those of the
ditengine reference, so the same function) on the CFG batch, plus the guidance and the scheduler step;
where diffusers is not installed (the GPU machine) they are ditengine's reference spec, which equals
diffusers' in fp32 (tested), and the table says which. The fused rows time the per-prompt text side
(caption projection and every block's K/V) apart, in the `prompt ms` column: it runs once per call, not
per step.
"""
from __future__ import annotations

import copy

import torch

import ditengine as de
from ditengine.models.pixart import PixArt, PixArtConfig, to_diffusers_state_dict

from .peers import PeerGraph
from .twin import diffusers_transformer
from .workload import Workload

# name -> (text tokens the pipeline pads to, config fields beyond the shared ones)
FAMILIES = {"alpha": (120, {}), "sigma": (300, {"use_additional_conditions": False})}
PROMPT_TOKENS = 20  # valid tokens of the timed prompt; the negative prompt "" is one token (EOS)
CPU_DEPTH = 4  # the CPU default: 4 of the 28 layers at the real width, a ladder of about a minute


def family(name: str) -> str:
    key = name.lower().removeprefix("pixart").strip("-_ ")
    aliases = {"α": "alpha", "a": "alpha", "alpha": "alpha", "σ": "sigma", "s": "sigma", "sigma": "sigma"}
    if key not in aliases:
        raise SystemExit(f"--model {name!r}: expected PixArt-α (PixArt-alpha) or PixArt-Σ (PixArt-sigma)")
    return aliases[key]


def pixart_flops(cfg: PixArtConfig, T: int, L: int, model_batch: int) -> float:
    """FLOPs of one step's forward (2 per multiply-add): the per-prompt K/V projection is not in a step."""
    D, M = cfg.hidden_size, cfg.mlp_hidden
    per_block = 2 * T * (4 * D * D + 2 * D * D + 2 * D * M) + 4 * T * T * D + 4 * T * L * D
    patch = 2 * T * D * cfg.in_channels * cfg.patch_size**2
    final = 2 * T * D * cfg.patch_size**2 * cfg.out_channels
    return model_batch * (cfg.num_layers * per_block + patch + final)


class PipelineCall(torch.nn.Module):
    """The transformer as PixArt's pipeline calls it, with positional inputs for the ONNX exporter: (x, t, the
    caption embeddings, their mask[, resolution, aspect ratio]) -> the model output (noise and variance channels)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, hidden, keep, resolution=None, aspect_ratio=None):
        added = None if resolution is None else {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.transformer(x, encoder_hidden_states=hidden, encoder_attention_mask=keep, timestep=t,
                                added_cond_kwargs=added, return_dict=False)[0]


def pixart_setup(args, device):
    """(config, fp32 reference model, FLOPs per model batch, workload per batch) for the PixArt ladder."""

    kind = family(args.model)
    tokens, extra = FAMILIES[kind]
    image = args.image_size or (8 * args.input_size if args.input_size else 256)
    depth = args.depth or (28 if device.type == "cuda" else CPU_DEPTH)
    cfg = PixArtConfig(sample_size=image // 8, num_layers=depth, attention_head_dim=72,
                       num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152, **extra)
    torch.manual_seed(args.seed)
    base = PixArt(cfg).eval().to(device)
    with torch.no_grad():  # the zero-free init of a trained model's tables, so every branch is live
        for block in base.blocks:
            block.scale_shift_table.normal_(0, 0.02)
    sched = de.schedulers.DPMSolverPP(args.steps).to(device)
    diffusers_model = diffusers_transformer(base, "PixArtTransformer2DModel", to_diffusers_state_dict(base))
    T = cfg.num_tokens

    def workload(batch):
        g = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device, generator=g)
        text = torch.randn(batch, tokens, 4096, device=device, generator=g)
        negative = torch.randn(batch, tokens, 4096, device=device, generator=g)
        valid = torch.arange(tokens, device=device)[None]
        mask = (valid < PROMPT_TOKENS).long().expand(batch, -1)
        negative_mask = (valid < 1).long().expand(batch, -1)
        named = dict(prompt_embeds=text, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                     negative_prompt_attention_mask=negative_mask)
        if cfg.use_additional_conditions:
            named["added_cond_kwargs"] = {"resolution": torch.tensor([[image, image]] * batch, device=device).float(),
                                          "aspect_ratio": torch.ones(batch, 1, device=device)}

        def eager_model(dtype, sdpa):  # diffusers' attention is SDPA in every row
            return copy.deepcopy(diffusers_model if diffusers_model is not None else base).to(dtype)

        def pipeline_inputs(use_cfg, dtype):
            """The transformer's conditioning on the CFG batch (prompt rows, then the negative's), by input name."""
            rows = [text, negative] if use_cfg else [text]
            keep = torch.cat([mask, negative_mask] if use_cfg else [mask])
            inputs = {"hidden": torch.cat(rows).to(dtype), "keep": keep}
            added = named.get("added_cond_kwargs") or {}
            return inputs | {k: torch.cat([v] * len(rows)).to(dtype) for k, v in added.items()}

        def eager_forward(model, use_cfg):
            call, inputs = PipelineCall(model), pipeline_inputs(use_cfg, next(model.parameters()).dtype)
            return lambda x_in, t, step: call(x_in, t, *inputs.values())

        def peer_graph(use_cfg):
            module = PipelineCall(eager_model(torch.float32, True)).eval()
            return PeerGraph(module, pipeline_inputs(use_cfg, torch.float32))

        label = "diffusers PixArtTransformer2DModel" if diffusers_model is not None else \
            "ditengine's PixArt reference (diffusers not installed)"
        return Workload(base, sched, noise, named=named, eager_model=eager_model, eager_forward=eager_forward,
                        eager_label=label, peer_graph=peer_graph)

    return cfg, base, lambda model_batch: pixart_flops(cfg, T, tokens, model_batch), workload
