"""The family registry and the denoiser contract: a toy video family with 5-D latents (B, C, F, H, W), written in
this file alone and added with one `register` call, samples through `FastSampler` equal to the reference loop in
every graph mode; a denoiser missing a core method fails at construction, naming it; optional capabilities are
refused by name; `sample(..., stats={})` works for every registered family."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ditengine as de
from ditengine import families
from ditengine.fast import FusedDenoiser
from ditengine.inputs import guided_labels
from ditengine.models.dit import timestep_embedding

FREQ = 32


@dataclass
class ToyConfig:
    in_channels: int = 3
    hidden_size: int = 16
    depth: int = 2
    num_classes: int = 5
    frames: int = 3
    size: int = 4


class ToyVideo(nn.Module):
    """A token per (frame, row, column); blocks x += gate * fc(LN(x)(1 + scale) + shift), adaLN from t and a label."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config, D = cfg, cfg.hidden_size
        self.embed = nn.Linear(cfg.in_channels, D)
        self.t_mlp = nn.Sequential(nn.Linear(FREQ, D), nn.SiLU(), nn.Linear(D, D))
        self.y_table = nn.Embedding(cfg.num_classes + 1, D)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ada": nn.Linear(D, 3 * D), "fc": nn.Linear(D, D)})
                                    for _ in range(cfg.depth))
        self.final_ada, self.out = nn.Linear(D, 2 * D), nn.Linear(D, cfg.in_channels)

    def conditioning(self, t, y):
        return F.silu(self.t_mlp(timestep_embedding(t, FREQ)) + self.y_table(y))  # (..., D)

    def forward(self, x, t, y):
        B, C, *grid = x.shape
        D = self.config.hidden_size
        h = self.embed(x.flatten(2).transpose(1, 2))  # (B, T, D)
        c = self.conditioning(t, y)
        for blk in self.blocks:
            shift, scale, gate = blk["ada"](c)[:, None].chunk(3, -1)
            h = h + gate * blk["fc"](F.layer_norm(h, (D,)) * (1 + scale) + shift)
        shift, scale = self.final_ada(c)[:, None].chunk(2, -1)
        out = self.out(F.layer_norm(h, (D,)) * (1 + scale) + shift)  # (B, T, C)
        return out.transpose(1, 2).reshape(B, C, *grid)


def toy_forward(model, spec, noise, use_cfg, class_labels, cache=None):
    y = guided_labels(class_labels, spec.config.num_classes, use_cfg)
    return lambda x_in, t, step: model(x_in, t, y[:len(x_in)])


class FastToy(FusedDenoiser):
    """The contract in plain PyTorch on the model's own modules (no kernels): what a new family starts from."""

    def __init__(self, model, dtype, mlp_epilogue="auto", residual_dtype=None, backend=None, quantize=None):
        super().__init__(model, dtype, mlp_epilogue, residual_dtype, backend, quantize)
        cfg = self.config
        self.model, self.D = model, cfg.hidden_size
        self.latent_shape, self.out_channels = (cfg.in_channels, cfg.frames, cfg.size, cfg.size), cfg.in_channels

    def inputs(self, model, noise, use_cfg, class_labels):
        return {"class_labels": class_labels}

    def context_key(self, cond):
        return ()

    def context_buffers(self, rows, latent_shape, cond):
        return {"y": torch.zeros(rows, dtype=torch.long, device=self.device)}

    def write_context(self, ctx, cond, use_cfg):
        ctx["y"].copy_(guided_labels(cond["class_labels"], self.config.num_classes, use_cfg))

    def modulation(self, t, ctx):
        c = self.model.conditioning(t[:, None], ctx["y"][None])  # (S, N, D)
        return torch.stack([blk["ada"](c) for blk in self.model.blocks], 2), self.model.final_ada(c)

    def modulation_shapes(self, steps, rows):
        return [(steps, rows, self.config.depth, 3 * self.D), (steps, rows, 2 * self.D)]

    def token_shape(self, latent_shape, cond=None):
        return math.prod(latent_shape[1:]), self.D

    def embed(self, x, ctx):
        return self.model.embed(x.flatten(2).transpose(1, 2))

    def first_norm(self, resid, mod, ctx=None):
        return F.layer_norm(resid, (self.D,))

    def block(self, i, resid, h, mod, ctx, keep=None):
        shift, scale, gate = mod[0][:, i, None].chunk(3, -1)
        resid.add_(gate * self.model.blocks[i]["fc"](h * (1 + scale) + shift))
        return resid, self.final_norm(resid, mod) if i + 1 == self.config.depth else F.layer_norm(resid, (self.D,))

    def final_norm(self, resid, mod, ctx=None):
        shift, scale = mod[1][:, None].chunk(2, -1)
        return F.layer_norm(resid, (self.D,)) * (1 + scale) + shift

    def final(self, h):
        return self.model.out(h)  # (N, T, C)

    def unpatchify(self, out, ctx):
        return out.transpose(1, 2).reshape(len(out), self.out_channels, *self.latent_shape[1:])


@pytest.fixture
def toy_family():
    family = families.register(families.Family(
        name="toy-video", spec=ToyVideo, config=ToyConfig, fast=FastToy, forward=toy_forward,
        channels=lambda cfg: cfg.in_channels, depth=lambda model: model.config.depth))
    yield family
    families.unregister(family.name)


@pytest.mark.parametrize("cuda_graph", [None, "step", "loop"])
def test_a_toy_video_family_samples_like_the_reference_loop(toy_family, cuda_graph):
    torch.manual_seed(0)
    model = ToyVideo(ToyConfig()).eval()
    sched = de.schedulers.DDIM(4, timestep_spacing="trailing")
    noise = torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4])
    want = de.sample(model, sched, noise, labels, cfg_scale=2.0, progress=False)
    sampler = de.FastSampler(model, sched, cfg_scale=2.0, dtype=torch.float32, cuda_graph=cuda_graph)
    got = sampler(noise, labels)
    assert got.shape == noise.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert families.of_model(model) is toy_family
    assert (want - noise).abs().max() > 0.1  # the loop moved the latents


def test_a_denoiser_missing_a_core_method_fails_at_construction():
    class NoBlock(FastToy):
        pass

    del_block = {k: v for k, v in vars(FastToy).items() if k != "block"}
    Broken = type("Broken", (FusedDenoiser,), del_block)
    with pytest.raises(TypeError, match="block"):
        Broken(ToyVideo(ToyConfig()), torch.float32)
    assert NoBlock(ToyVideo(ToyConfig()), torch.float32).depth == 2


def test_optional_capabilities_are_refused_by_name(toy_family):
    model = ToyVideo(ToyConfig())
    with pytest.raises(ValueError, match="cache: FastToy has no reuse_block"):
        de.FastSampler(model, de.schedulers.DDIM(4), cache=de.cache.StaticCache(), dtype=torch.float32)
    with pytest.raises(ValueError, match="ToyVideo has none: use backend='fused'"):
        de.sample(model, de.schedulers.DDIM(4), torch.randn(1, 3, 3, 4, 4), torch.tensor([0]),
                  cache=de.cache.StaticCache(), progress=False)


def test_registering_something_else_is_refused():
    with pytest.raises(TypeError, match="expected a ditengine.families.Family"):
        families.register(("toy", ToyVideo))
    with pytest.raises(TypeError, match="fast: expected a FusedDenoiser subclass"):
        families.register(families.Family(name="bad", spec=ToyVideo, fast=ToyVideo, forward=toy_forward,
                                          channels=lambda c: 3, depth=lambda m: 2))


def test_sample_fills_stats_for_every_family():
    import test_flux
    import test_sd3

    for module in (test_flux, test_sd3):
        model = module.flux() if module is test_flux else module.sd3()
        sched = module.schedule()
        cond = module.conditioning(model)
        stats = {}
        out = de.sample(model, sched, module.noise(), cfg_scale=1.0, progress=False, stats=stats, **cond)
        depth = families.of_model(model).depth(model)
        assert torch.isfinite(out).all() and stats["block_evals"] == len(sched) * depth, stats
