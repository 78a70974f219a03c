"""`ditengine-bench`: the step-latency ladder, from the eager fp32 reference to the graph-captured fused loop.

One "step" is what a sampling loop repeats: the DiT forward on the CFG-doubled batch, the guidance
combine and the scheduler update. Rows are cumulative and timed in the same process (warm-up, then the
median and p20/p80 of repeated steps, CUDA events on GPU):

    eager-fp32        the reference model in fp32, explicit softmax attention
    eager-lp          ... in the low-precision dtype (--dtype)
    eager-lp-sdpa     ... with scaled_dot_product_attention
    compile           torch.compile(mode="max-autotune") of eager-lp-sdpa: the peer to beat
    compile-fp32      ... of the fp32 model with SDPA
    onnxruntime-fp32, onnxruntime-int8, openvino-fp32, openvino-bf16, openvino-int8
                      the CPU runtimes on the reference DiT exported to ONNX (bench/peers.py, the optional
                      `.[peers]` extra): the same step around their forward; a peer that is not installed is
                      skipped with the reason, printed and kept in the report's "skipped"
    fused             FastSampler: fused kernels, conditioning computed per step, no graph
    fused+precond     ... conditioning precomputed for all steps
    fused+graph-step  ... one step captured as a CUDA graph, replayed per step
    fused+graph-loop  ... the whole loop captured, replayed once (ms/step = loop / steps)
    gemm-floor        the fused path's token GEMMs alone (patch embedding, every block's qkv, proj, fc1 and
                      fc2, the final linear) at the same shapes and weights: the practical floor of a CPU
                      step; every row reports its % of it
    fused+precond+int8, fused+graph-loop+int8, fused+graph-loop+fp8
                      ... with the blocks' token GEMMs as W8A8 (`FastSampler(quantize=)`)
    fused+graph-loop+cache-first-block, fused+graph-loop+cache-static
                      ... with step caching (ditengine.cache, each policy's defaults): ms/step averages the
                      full and the cached steps of the loop; `block share` is the share of the transformer
                      blocks computed, and the quality columns show what the skipped work cost

Each row also reports images/s, peak memory, setup time (compile or capture; for the fused rows also `new shape s`,
what a first call at a new shape costs: its plan, on a GPU the graph capture, and its first step), achieved TFLOP/s, the
share of docs/design.md's H100 floor, and the quality of a full sampling run from the same noise against the
fp32 reference (max error and SQNR of the final latents). Results go to JSON, CSV, a markdown table and
a PNG bar chart. Every ditengine row is set against the fastest peer of the same precision measured in the same
run ("vs fastest peer at this precision": the peer's ms/step over the row's). The default is CPU-sized (DiT-S/2,
32x32 latent, batch 1 with CFG, bf16; on a CPU the rows `CPU_DEFAULT`: fp32 eager and compile, the installed
fp32 and int8 peers, ditengine's exact and int8 rows and the GEMM floor, and where the CPU multiplies bf16 in
hardware `CPU_BF16_PEERS` too: eager bf16, its compile and OpenVINO bf16); the GPU case is `--model DiT-XL/2
--image-size 256 --batch 1,8`. On a CPU the compile rows use torch.compile's default mode (its max-autotune GEMM
templates take many minutes to tune there).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import ditengine as de
from ditengine import families
from ditengine.cache import FirstBlockCache, StaticCache
from ditengine.sampling import denoise_step, run_loop

from . import peers
from .dit import dit_flops  # noqa: F401 (the DiT's FLOPs, imported from here by earlier code)
from .metrics import sqnr_db
from .workload import Workload
from .memory import PeakMemory, held_tensors, tensor_bytes
from .timing import environment, measure, synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = {"fused+precond+int8": "int8", "fused+graph-loop+int8": "int8", "fused+graph-loop+fp8": "fp8"}
VARIANTS = ("eager-fp32", "eager-lp", "eager-lp-sdpa", "compile", "compile-fp32", *peers.PEERS, "fused",
            "fused+precond", "fused+graph-step", "fused+graph-loop", *QUANTIZED, "gemm-floor",
            "fused+graph-loop+cache-first-block", "fused+graph-loop+cache-static")
CPU_DEFAULT = ("eager-fp32", "compile-fp32", *(p for p in peers.PEERS if p != "openvino-bf16"), "fused+precond",
               "fused+precond+int8", "gemm-floor")
# On a CPU with bf16 dot instructions the bf16 rows meet their own peers: eager bf16, its compile, OpenVINO in bf16.
CPU_BF16_PEERS = ("eager-lp-sdpa", "compile", "openvino-bf16")
GPU_SKIPPED = ("gemm-floor", "compile-fp32", "fused+precond+int8", *peers.PEERS)  # not in the GPU default
CACHE_VARIANTS = {"fused+graph-loop+cache-first-block": FirstBlockCache, "fused+graph-loop+cache-static": StaticCache}
# docs/design.md section 8: measured on an H100, the floor of a step is max(FLOPs / peak, bytes / bandwidth).
H100_BF16_TFLOPS, H100_COPY_TBPS = 790.0, 3.0


def floor_ms(flops: float, weight_bytes: int) -> float:
    return 1e3 * max(flops / (H100_BF16_TFLOPS * 1e12), weight_bytes / (H100_COPY_TBPS * 1e12))


def reference_step(workload: Workload, model, cfg_scale: float, i: int = 0, forward=None):
    """One eager step as `ditengine.sample` runs it, around the model or a given fp32 `forward` (a peer);
    returns a closure (the state is not advanced)."""
    forward = forward or workload.eager_forward(model, cfg_scale != 1.0)
    x = workload.noise * workload.sched.init_noise_sigma
    dtype = torch.float32 if model is None else next(model.parameters()).dtype
    channels = workload.noise.shape[1]
    return lambda: denoise_step(forward, workload.sched, i, x, cfg_scale, channels, dtype)


class Variant:
    """One ladder row: `setup()` builds it (timed), `step()` is the timed unit, `sample()` a full run."""

    def __init__(self, key, workload: Workload, args, dtype, batch):
        self.key, self.workload, self.sched, self.args, self.batch = key, workload, workload.sched, args, batch
        self.dtype = torch.float32 if key in ("eager-fp32", "compile-fp32", *peers.PEERS) else dtype
        self.per_call_steps = 1
        self.setup_s = 0.0
        self.prompt_ms = None  # fused rows: the per-prompt precompute (text side), timed apart from the steps
        self.new_shape_s = None  # fused rows: a first call at a new shape (plan, graph capture, its first step)

    def setup(self):
        key, args, w = self.key, self.args, self.workload
        noise = w.noise
        start = time.perf_counter()
        if key.startswith("eager") or key.startswith("compile"):
            model = w.eager_model(self.dtype, key not in ("eager-fp32", "eager-lp"))
            if key.startswith("compile"):
                model = torch.compile(model, mode="max-autotune" if noise.device.type == "cuda" else None)
            self.model = model
            self.step = reference_step(w, model, args.cfg_scale)
            with torch.inference_mode():
                self.step()  # compile (or warm) here, so setup_s carries the compile time
        elif key in peers.PEERS:
            self.peer = peer_forward(key, w, args)  # raises peers.PeerUnavailable: the row is skipped
            self.step = reference_step(w, None, args.cfg_scale, forward=self.peer)
            self.step()
        elif key == "gemm-floor":
            rows = self.batch * (2 if args.cfg_scale != 1.0 else 1)
            fast = de.fast.fused_denoiser(w.base, self.dtype)
            if fast.step_gemms is None:
                raise peers.PeerUnavailable(f"{type(fast).__name__} has no step_gemms: no GEMM floor")
            cond = fast.inputs(w.base, noise, args.cfg_scale != 1.0, *w.conditioning, **w.named)
            self.step = gemm_floor_step(fast, rows, tuple(noise.shape[1:]), cond)
        else:
            graph_modes = {"fused+graph-step": "step", "fused+graph-loop": "loop"}
            mode = "loop" if key in CACHE_VARIANTS else graph_modes.get(key)
            cache = CACHE_VARIANTS[key]() if key in CACHE_VARIANTS else None
            if key in QUANTIZED:
                mode = "loop" if "graph-loop" in key else None
            self.sampler = de.FastSampler(w.base, self.sched, cfg_scale=args.cfg_scale, dtype=self.dtype,
                                          cuda_graph=mode, precompute_conditioning=key != "fused", cache=cache,
                                          quantize=QUANTIZED.get(key), parallel=args.parallel, **w.sampler_kwargs)
            cond = self.sampler.fast.inputs(w.base, noise, self.sampler.use_cfg, *w.conditioning, **w.named)
            first = time.perf_counter()
            plan = self.sampler.plan(noise.shape, cond)
            plan.prepare(noise, cond)
            if mode == "loop":
                self.step = lambda: plan.run(None, False)
                self.per_call_steps = len(self.sched)
            elif mode == "step":
                self.step = lambda: (plan.step_idx.fill_(0), plan.runner())
            else:
                self.step = lambda: plan.step_body(0)
            self.step()  # the first at this shape: on a GPU its graphs are captured here
            synchronize(noise.device)
            self.new_shape_s = time.perf_counter() - first
            timing = measure(lambda: plan.write_context(cond), noise.device, 1, 5)
            self.prompt_ms = timing["median_ms"]
        self.setup_s = time.perf_counter() - start
        # The weights this row runs, in the forms it holds them (eager: the model; fused: packed, stacked, aliased).
        held = getattr(self, "sampler", None) and self.sampler.fast or getattr(self, "model", None)
        self.weight_bytes = tensor_bytes(held_tensors(held)) if held is not None else None

    def sample(self):
        if self.key == "gemm-floor":
            return None  # GEMMs on random activations: no sample to judge
        w = self.workload
        g = torch.Generator(w.noise.device).manual_seed(self.args.seed)
        if hasattr(self, "sampler"):
            return self.sampler(w.noise, *w.conditioning, generator=g, **w.named)
        if hasattr(self, "peer"):
            forward, dtype = self.peer, torch.float32
        else:  # ditengine.sample's loop around the eager model
            forward, dtype = (w.eager_forward(self.model, self.args.cfg_scale != 1.0),
                              next(self.model.parameters()).dtype)
        return run_loop(forward, self.sched, w.noise, self.args.cfg_scale, w.noise.shape[1], dtype, g)


def peer_forward(name: str, workload: Workload, args):
    """The peer runtime's forward on the workload's CFG-doubled batch (the families whose workload has a peer graph)."""
    if workload.peer_graph is None:
        raise peers.PeerUnavailable(f"the runtime peers do not export {type(workload.base).__name__}")
    use_cfg = args.cfg_scale != 1.0
    x_in = torch.cat([workload.noise] * (2 if use_cfg else 1))
    t = workload.sched.timesteps[:1].expand(len(x_in)).float()
    return peers.peer_forward(name, workload.peer_graph(use_cfg), x_in, t, Path(args.out) / "peers")


def gemm_floor_step(fast, rows: int, latent_shape: tuple, cond: dict):
    """A closure running the fused step's token GEMMs alone, through the same calls and weights."""
    gemms = fast.step_gemms(rows, latent_shape, cond)
    acts = {shape: torch.randn(shape, device=fast.device, dtype=fast.dtype) for _, shape in gemms}

    def step():
        for gemm, shape in gemms:
            gemm(acts[shape])

    return step


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ditengine-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2",
                   help="config name, e.g. DiT-XL/2, Flux.1-dev, SD3.5-medium (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--input-size", type=int, help="latent height = width (default 32)")
    size.add_argument("--image-size", type=int, help="pixel size; the latent is image-size / 8 (VAE factor)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes before CFG doubling (default: 1)")
    p.add_argument("--dtype", choices=DTYPES, help="low-precision dtype (default: bf16)")
    p.add_argument("--cfg-scale", type=float, help="1.0 disables guidance (no batch doubling); default 4.0, and "
                                                   "1.0 for ACE-Step (the turbo model; > 1 runs APG)")
    p.add_argument("--duration", type=float, help="ACE-Step: seconds of music (default: 30 on a CPU, 240 on a GPU)")
    p.add_argument("--steps", type=int, help="sampling steps of the quality run and the loop graph "
                                             "(default: 50 on GPU, 5 on CPU)")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all; on a "
                                      "CPU all but compile and the +cache rows)")
    p.add_argument("--depth", type=int, help="override the number of blocks (quick runs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-out", help="directory for the results (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    for name in ("ulysses", "ring", "cfg"):  # None: not given, degree 1 and no process group
        p.add_argument(f"--{name}-degree", type=int,
                       help="under torchrun: the fused rows run with ditengine.ParallelConfig (docs/parallel.md); "
                            "any of the three given, even as 1, asks for the parallel layout (default 1)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or "bf16"
    family = families.of_bench_model(args.model)
    if args.cfg_scale is None:  # e.g. ACE-Step turbo and Flux (dev embeds its guidance) run no CFG batch
        args.cfg_scale = family.bench_defaults.get("cfg_scale", 4.0)
    args.steps = args.steps or (50 if gpu else 5)
    default = [v for v in VARIANTS if v not in GPU_SKIPPED and v not in CACHE_VARIANTS] if gpu else list(CPU_DEFAULT)
    if not gpu and args.dtype == "bf16" and peers.bf16_dot_instructions():
        default = [v for v in VARIANTS if v in default or v in CPU_BF16_PEERS]
    if not family.bench_peers:  # the runtime peers export the families that say so (DiT, PixArt)
        default = [v for v in default if v not in peers.PEERS]
    args.variants = args.variants.split(",") if args.variants else default
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if DTYPES[args.dtype] == torch.float32 and "eager-lp" in args.variants and "eager-fp32" in args.variants:
        args.variants.remove("eager-lp")  # the same row twice
    # Giving a degree explicitly, even 1, asks for the layout: `--ulysses-degree 1` under a one-rank torchrun runs
    # the parallel path and its collectives on one device (bench/gpu_check.sh --parallel), where no flag runs the
    # plain one-process path.
    degrees = (args.ulysses_degree, args.ring_degree, args.cfg_degree)
    requested = any(d is not None for d in degrees)
    args.ulysses_degree, args.ring_degree, args.cfg_degree = (1 if d is None else d for d in degrees)
    args.parallel = None
    if requested:
        others = [v for v in args.variants if not v.startswith("fused")]
        if others:
            p.error(f"--ulysses-degree / --ring-degree / --cfg-degree run the fused rows only, not {others}: pass "
                    "--variants with fused rows (the one-process rows are a run of their own)")
        args.parallel = de.ParallelConfig(args.ulysses_degree, args.ring_degree, args.cfg_degree)
    return args


def join_group(args) -> int:
    """Under torchrun with a parallel layout: the process group (NCCL on CUDA, each rank its local device; gloo on a
    CPU) and this rank; 0 otherwise."""
    if args.parallel is None:
        return 0
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("--ulysses-degree / --ring-degree / --cfg-degree: launch with torchrun --nproc_per_node N")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = join_group(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batch.split(",")]
    cfg, base, flops_of, workload_for = families.of_bench_model(args.model).bench_setup()(args, device)
    weight_bytes = sum(p.numel() for p in base.parameters()) * dtype.itemsize
    results, skipped = [], {}
    report = {"env": environment(device), "model": args.model, "config": dict(cfg.__dict__), "args": vars(args),
              "scheduler": None, "flops_per_step": {b: flops_of(b * 2) for b in batches}, "results": results,
              "skipped": skipped}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"bench-partial-{time.strftime('%Y%m%d-%H%M%S')}.json"
    bar = tqdm(total=len(args.variants) * len(batches), desc="benchmark", leave=False, disable=rank != 0)
    for batch in batches:
        workload = workload_for(batch)
        report["scheduler"] = repr(workload.sched)
        dims = workload.noise.shape[1:] if workload.audio_seconds else workload.noise.shape[2:]  # (C, T) for music
        report["latent"] = "x".join(str(d) for d in dims)
        report["eager"] = workload.eager_label
        report["sample_name"], report["notes"] = workload.sample_name, workload.notes
        model_batch = batch * (2 if args.cfg_scale != 1.0 else 1)
        flops = flops_of(model_batch)
        with torch.inference_mode():
            reference = workload.sample(cfg_scale=args.cfg_scale,
                                        generator=torch.Generator(device).manual_seed(args.seed))
        for key in args.variants:
            bar.set_postfix_str(f"{key}, batch {batch}")
            variant = Variant(key, workload, args, dtype, batch)
            with torch.inference_mode(), PeakMemory(device) as mem:  # what the row adds: its weights' forms, its run
                try:
                    variant.setup()
                except peers.PeerUnavailable as reason:
                    skipped.setdefault(key, str(reason))
                    print(f"skipped {key}: {reason}")
                    bar.update()
                    continue
                loops = variant.per_call_steps > 1  # one call runs the whole loop: fewer calls
                timing = measure(variant.step, device, 1 if loops else args.warmup,
                                 max(3, args.repeats // variant.per_call_steps) if loops else args.repeats)
                latents = variant.sample()
            per_step = {k: v / variant.per_call_steps for k, v in timing.items() if k.endswith("_ms")}
            ms = per_step["median_ms"]
            results.append({
                "variant": key, "batch": batch, "model_batch": model_batch,
                "dtype": str(variant.dtype).removeprefix("torch."), "precision": precision(key, variant.dtype),
                **per_step, "runs": timing["runs"],
                "images_per_s": batch * 1e3 / (ms * len(workload.sched)),
                "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                "added_mem_mb": mem.peak / 2**20,
                "weights_gib": None if variant.weight_bytes is None else variant.weight_bytes / 2**30,
                "setup_s": variant.setup_s, "new_shape_s": variant.new_shape_s, "prompt_ms": variant.prompt_ms,
                "tflops": flops / ms / 1e9,
                "pct_of_h100_floor": 100 * floor_ms(flops, weight_bytes) / ms,
                "max_err": None if latents is None else (latents - reference).abs().max().item(),
                "sqnr_db": None if latents is None else sqnr_db(latents, reference),
                "conditioning": getattr(getattr(variant, "sampler", None), "conditioning_mode", None),
                **song_columns(workload, ms),
                **cache_columns(variant),
            })
            bar.update()
            del variant
            floor = next((r["median_ms"] for r in results if r["variant"] == "gemm-floor" and r["batch"] == batch),
                         None)
            for r in results:
                if floor and r["batch"] == batch:
                    r["pct_of_gemm_floor"] = 100 * floor / r["median_ms"]
            compare_with_peers(results, device)
            report["results"] = results
            if rank == 0:
                partial.write_text(json.dumps(report, indent=2, default=str))  # survives a run cut short
    bar.close()
    if rank == 0:  # every rank ran the same rows; one writes them
        report["parallel"] = None if args.parallel is None else {
            "ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree, "cfg_degree": args.cfg_degree}
        write_report(report, out_dir)
        partial.unlink()
    return 0


def precision(key: str, dtype: torch.dtype) -> str:
    """What a row computes in: its peer's or quantisation's name, else its dtype's ("fp32", "bf16", "fp16")."""
    if key in peers.PEERS:
        return key.rsplit("-", 1)[1]
    if key in QUANTIZED:
        return QUANTIZED[key]
    return next(name for name, d in DTYPES.items() if d == dtype)


def is_peer(key: str) -> bool:
    """A row that is not ditengine's: eager PyTorch (or diffusers), torch.compile, the CPU runtimes."""
    return key.startswith(("eager", "compile")) or key in peers.PEERS


def compare_with_peers(rows: list[dict], device: torch.device) -> None:
    """Each ditengine row against the fastest peer of the same precision and batch in the same run: `vs_peer`, that
    peer's ms over the row's (above 1: ditengine is faster), and `vs_peer_name`. bf16 on a CPU without bf16 dot
    instructions is emulated on every side and is left out."""
    emulated = device.type == "cpu" and not peers.bf16_dot_instructions()
    for r in rows:
        r["vs_peer"], r["vs_peer_name"] = None, None
        if not r["variant"].startswith("fused"):
            continue
        rivals = [p for p in rows if is_peer(p["variant"]) and p["batch"] == r["batch"]
                  and p["precision"] == r["precision"]]
        if emulated and r["precision"] == "bf16":
            r["vs_peer"], r["vs_peer_name"] = None, "bf16 emulated on this CPU"
        elif rivals:
            best = min(rivals, key=lambda p: p["median_ms"])
            r["vs_peer"], r["vs_peer_name"] = best["median_ms"] / r["median_ms"], best["variant"]


def song_columns(workload: Workload, ms_per_step: float) -> dict:
    """A music workload: seconds of DiT loop per song, and how many times faster than real time that is; an
    image workload that asks for it: seconds per image of the whole loop."""
    seconds = ms_per_step * len(workload.sched) / 1e3
    if workload.per_image_seconds:
        return {"s_per_image": seconds}
    if workload.audio_seconds is None:
        return {}
    return {"s_per_song": seconds, "realtime_x": workload.audio_seconds / seconds}


def cache_columns(variant: Variant) -> dict:
    """The share of transformer blocks the last full sampling run computed, and how a first-block cache
    took its decision (None for the reference rows)."""
    stats = getattr(getattr(variant, "sampler", None), "stats", None) or {}
    return {"block_share": stats.get("block_share"), "cache_decision": stats.get("decision")}


def format_table(report: dict) -> str:
    env = report["env"]
    layout = report.get("parallel")
    across = "" if not layout else ", over ranks: " + (" x ".join(f"{k} {v}" for k, v in layout.items() if v > 1)
                                                       or "one rank, every degree 1")
    head = (f"{report['model']}{across}, latent {report['latent']}, cfg {report['args']['cfg_scale']}, "
            f"{report['scheduler']}, eager rows: {report['eager']} | {env['device']} | torch {env['torch']}, "
            f"triton {env['triton']} | commit {env['commit']}")
    lines = [head, "",
             "| variant | batch | precision | ms/step | vs fastest peer at this precision | p20 | p80 | img/s "
             "| peak MB | added MB | weights GiB | setup s | new shape s | prompt ms | TFLOP/s | % H100 floor "
             "| % GEMM floor | max err | SQNR dB | block share |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    music = any("s_per_song" in r for r in report["results"])
    per_image = any("s_per_image" in r for r in report["results"])
    if music:  # seconds of DiT loop per song and the real-time factor, beside ms/step
        lines[-2] = lines[-2].replace("| ms/step |", "| ms/step | s/song | x real time |")
        lines[-1] += "---:|---:|"
    elif per_image:
        lines[-2] = lines[-2].replace("| ms/step |", f"| ms/step | s/{report.get('sample_name', 'image')} |")
        lines[-1] += "---:|"
    for r in report["results"]:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        added = f"{r['added_mem_mb']:.0f}" if r.get("added_mem_mb") is not None else "-"
        weights = f"{r['weights_gib']:.2f}" if r.get("weights_gib") is not None else "-"
        share = f"{100 * r['block_share']:.0f}%" if r.get("block_share") is not None else "-"
        gemm = f"{r['pct_of_gemm_floor']:.0f}" if r.get("pct_of_gemm_floor") else "-"
        err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
        sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        prompt = "-" if r.get("prompt_ms") is None else f"{r['prompt_ms']:.3f}"
        new_shape = "-" if r.get("new_shape_s") is None else f"{r['new_shape_s']:.2f}"
        song = f" {r['s_per_song']:.2f} | {r['realtime_x']:.1f} |" if music else \
            f" {r['s_per_image']:.2f} |" if per_image else ""
        vs = "-" if r.get("vs_peer_name") is None else r["vs_peer_name"] if r.get("vs_peer") is None else \
            f"{r['vs_peer']:.2f}x {r['vs_peer_name']}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r.get('precision', r['dtype'])} | {r['median_ms']:.3f} |"
                     f"{song} {vs} | "
                     f"{r['p20_ms']:.3f} | "
                     f"{r['p80_ms']:.3f} | {r['images_per_s']:.2f} | {mem} | {added} | {weights} | "
                     f"{r['setup_s']:.1f} | {new_shape} | {prompt} | "
                     f"{r['tflops']:.2f} | {r['pct_of_h100_floor']:.1f} | {gemm} | {err} | {sqnr} | {share} |")
    lines += [f"\n{note}" for note in report.get("notes", [])]
    lines += [f"\nskipped {key}: {reason}" for key, reason in report.get("skipped", {}).items()]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report["results"][0]))
        writer.writeheader()
        writer.writerows(report["results"])
    table = format_table(report)
    Path(f"{stem}.md").write_text(table + "\n")
    print(table)
    try:
        chart(report, Path(f"{stem}.png"))
        print(f"\nresults: {stem}.{{json,csv,md,png}}")
    except ImportError:
        print(f"\nresults: {stem}.{{json,csv,md}} (install matplotlib, the 'bench' extra, for the chart)")


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in report["results"] if r["batch"] == batch]
        ax.barh([r["variant"] for r in rows], [r["median_ms"] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("ms / step (median)")
        ax.set_title(f"{report['model']}, batch {batch} (+CFG)")
    fig.suptitle(report["env"]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
