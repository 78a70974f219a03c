"""Memory at real scale: what loading a checkpoint, `from_diffusers` and `accelerate` hold, in bytes and as
multiples of the transformer's own bytes, with the set-up time beside them.

The model is Flux.1 at its real width (3072 wide, 24 heads of 128, T5 4096, CLIP 768) with few blocks (default
1 double + 2 single: 0.65 B parameters), random bf16 weights. Each measurement runs in a fresh process, so that
nothing another one allocated is counted:

    python -m ditengine.bench.memory [--layers 1 --single-layers 2] [--out DIR]    # every measurement, a table

On a CPU the peak is the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs before the
measured step), or where that reset is refused, the resident set sampled every millisecond; the residue is the
resident set after the step, less the one before it. On CUDA both are `torch.cuda` allocator figures
(`max_memory_allocated`, `memory_allocated`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# Flux.1-dev's transformer at its real width (diffusers' FluxTransformer2DModel config), depth chosen per run.
FLUX_WIDTH = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
# The same model at a tiny width, run first in every process: the library's code and thread pools are paged in
# before the measured step, so its figures are the weights' alone.
WARM_UP = dict(FLUX_WIDTH, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
               pooled_projection_dim=32, axes_dims_rope=(8, 28, 28))
MEASUREMENTS = ("load", "from_diffusers", "accelerate", "accelerate_release")


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (shared storage counted once; oneDNN's packed weights, which
    expose no storage, by their size)."""
    seen, total = set(), 0
    for t in tensors:
        if t.is_meta:
            continue
        if t.is_mkldnn:
            key, size = id(t), t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            key, size = (storage.data_ptr(), str(t.device)), storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def held_tensors(obj, _seen=None):
    """Every tensor an object holds, through its attributes, dicts, lists and tuples (a fused denoiser's forms of
    the weights, packed or not)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from held_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from held_tensors(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from held_tensors(vars(obj), seen)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak and the residue of a block of code, in bytes above what was held when it began."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = rss_bytes()
        self.sampled, self._stop = self.start, threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.thread = None
        except OSError:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.sampled = max(self.sampled, rss_bytes())

    def __exit__(self, *exc):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak, self.residue = torch.cuda.max_memory_allocated() - self.start, torch.cuda.memory_allocated() - \
                self.start
            return False
        if self.thread is None:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        else:
            self._stop.set()
            self.thread.join()
            hwm = self.sampled
        self.peak, self.residue = max(hwm, rss_bytes()) - self.start, rss_bytes() - self.start
        return False


def flux_transformer(num_layers: int, num_single_layers: int, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     seed: int = 0, width: dict = FLUX_WIDTH):
    """A real-width diffusers FluxTransformer2DModel with random weights, allocated once in `dtype` (built on meta,
    so no fp32 copy is ever made)."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=num_layers, num_single_layers=num_single_layers, **width)
    for p in model.parameters():  # on meta, in place: diffusers' .to(dtype) warns about fp32 modules it has none of
        p.data = p.data.to(dtype)
    return fill_random(model.to_empty(device=device).eval(), seed)  # dtype first: no fp32 form is allocated


def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Every parameter of a model allocated uninitialised (`to_empty`) filled in place: a norm module's (a class
    named ...Norm) weight 1 and bias 0, the rest N(0, std^2), drawn where they live. Random weights of a model too
    large to initialise on the host first."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    norms = {id(p): float(name == "weight") for m in model.modules() if type(m).__name__.endswith("Norm")
             for name, p in m.named_parameters(recurse=False)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(norms[id(p)])
            else:
                p.normal_(0.0, std, generator=g)
    return model


def flux_pipeline(transformer):
    """FluxPipeline around `transformer` with a one-level VAE (16 latent channels) and no text encoders: called
    with embeddings, as the tests call it."""
    import diffusers

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=16, norm_num_groups=4, sample_size=16,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  shift_factor=0.1159, scaling_factor=0.3611).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe, dev: torch.device, dtype: torch.dtype, size: int = 64, steps: int = 2,
                  text_tokens: int = 32) -> torch.Tensor:
    """One small call of a pipeline or its accelerated form (latents out): the first call's work beyond set-up
    is kept small."""
    g = torch.Generator().manual_seed(1)
    cfg = pipe.transformer.config if hasattr(pipe, "vae") else pipe.pipe.transformer.config
    embeds = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g).to(dev, dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dev, dtype)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent").images


def measure(what: str, folder: Path, layers: int, single_layers: int, device: str) -> dict:
    """One measurement in this process."""
    import ditengine as de

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = flux_transformer(1, 1, device=dev, width=WARM_UP)
        tiny.save_pretrained(tmp)
        de.load_checkpoint(tmp, dtype=torch.bfloat16, device=dev)
        pipeline_call(de.accelerate(flux_pipeline(tiny), dtype=torch.bfloat16), dev, torch.bfloat16)
        del tiny
    if what == "load":
        with PeakMemory(dev) as mem:
            start = time.perf_counter()
            model = de.load_checkpoint(folder, dtype=torch.bfloat16, device=dev)
            seconds = time.perf_counter() - start
        weights = tensor_bytes(model.state_dict().values())
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        return dict(weights=weights, peak=mem.peak, residue=mem.residue, seconds=seconds, dtypes=dtypes)
    transformer = flux_transformer(layers, single_layers, device=dev)
    weights = tensor_bytes(transformer.state_dict().values())
    if what == "from_diffusers":
        with PeakMemory(dev) as mem:
            model = de.from_diffusers(transformer)
        return dict(weights=weights, peak=mem.peak, residue=mem.residue, seconds=0.0)
    pipe = flux_pipeline(transformer)
    with PeakMemory(dev) as mem:
        start = time.perf_counter()
        fast = de.accelerate(pipe, dtype=torch.bfloat16, release_transformer=what == "accelerate_release")
        latents = pipeline_call(fast, dev, torch.bfloat16)
        seconds = time.perf_counter() - start
    return dict(weights=weights, peak=mem.peak, residue=mem.residue, seconds=seconds,
                finite=bool(torch.isfinite(latents).all()))


def run(what: str, folder: Path, layers: int, single_layers: int, device: str = "cpu") -> dict:
    """`measure` in a fresh process (its figures, as a dict)."""
    cmd = [sys.executable, "-m", "ditengine.bench.memory", "--measure", what, "--folder", str(folder),
           "--layers", str(layers), "--single-layers", str(single_layers), "--device", device]
    # Run from the checkpoint's folder: a source checkout's top-level kernels/ would shadow the `kernels` package.
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_checkpoint(folder: Path, layers: int, single_layers: int, shard: str = "500MB") -> Path:
    """The real-width transformer saved as diffusers saves it: a sharded bf16 safetensors folder."""
    flux_transformer(layers, single_layers).save_pretrained(folder / "transformer", max_shard_size=shard)
    return folder


def table(results: dict) -> str:
    gib = 1 << 30
    lines = ["| step | transformer GiB | peak GiB (x weights) | residue GiB (x weights) | s (s/GiB) |",
             "|---|---:|---:|---:|---:|"]
    for what, r in results.items():
        w = r["weights"]
        lines.append(f"| {what} | {w / gib:.2f} | {r['peak'] / gib:.2f} ({r['peak'] / w:.2f}x) | "
                     f"{r['residue'] / gib:.2f} ({r['residue'] / w:.2f}x) | {r['seconds']:.1f} "
                     f"({r['seconds'] / (w / gib):.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1, help="double blocks (Flux.1-dev: 19)")
    p.add_argument("--single-layers", type=int, default=2, help="single blocks (Flux.1-dev: 38)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="a folder for memory.json and memory.md")
    p.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.layers, args.single_layers, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp), args.layers, args.single_layers)
        results = {what: run(what, folder, args.layers, args.single_layers, args.device) for what in MEASUREMENTS}
    report = table(results)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps(results, indent=2))
        (args.out / "memory.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
