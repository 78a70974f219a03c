"""Where a CPU step's time goes: ditengine's fused DiT step (the torch profiler) beside OpenVINO's inference of the
same DiT (its per-node performance counters), in the same categories and the same process.

    python -m ditengine.bench.breakdown [--model DiT-S/2] [--input-size 32] [--dtype bf16] [--depth N] [--json PATH]

Categories: GEMM (the token GEMMs, by shape), attention, norm and modulation (adaLN, gated residual, the final
layer's), fused subgraph (OpenVINO's snippets: the attention's matmuls and softmax with the element-wise chains
around them, compiled as one kernel), layout (reorders, copies, transposes), scheduler (ditengine's fused update;
OpenVINO runs the forward only, so the scheduler is ditengine's alone), other. Each side reports its total and each
category's milliseconds and share per step, and the kernels behind the GEMMs (oneDNN's implementation names, as
`ONEDNN_VERBOSE=1` prints them, for OpenVINO from its counters' exec types). Run it on an idle machine: the shares
hold under load, the milliseconds do not.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
from collections import defaultdict

import torch

import ditengine as de

from . import peers
from .dit import dit_peer_graph

CATEGORIES = ("GEMM", "attention", "norm+modulation", "fused subgraph", "layout", "scheduler", "other")

# torch profiler event names (ATen ops and ditengine's custom ops) -> category. Only leaf work is counted
# (self time), so a wrapper's children are not counted twice.
TORCH_RULES = (
    ("scheduler", ("scheduler_step",)),
    ("attention", ("attention", "softmax")),
    ("norm+modulation", ("adaln", "layer_norm", "rms_norm", "gated_residual")),
    ("GEMM", ("addmm", "mm", "linear", "matmul", "bmm", "mkldnn", "_int_mm", "baddbmm", "gelu", "swiglu")),
    ("layout", ("copy_", "contiguous", "clone", "transpose", "permute", "reshape", "view", "cat", "to_dense",
                "_to_copy", "empty_strided")),
)
# OpenVINO node types -> category.
OPENVINO_RULES = (
    ("attention", ("ScaledDotProductAttention", "MHA", "Softmax", "SDPA")),
    ("fused subgraph", ("Subgraph",)),
    ("GEMM", ("FullyConnected", "MatMul", "Convolution", "Gemm")),
    ("norm+modulation", ("MVN", "RMS", "LayerNorm", "NormalizeL2")),
    ("layout", ("Reorder", "Transpose", "Reshape", "Concatenation", "Split", "Gather", "StridedSlice", "Convert")),
)


def categorise(name: str, rules) -> str:
    lowered = name.lower()
    for category, keys in rules:
        if any(key.lower() in lowered for key in keys):
            return category
    return "other"


def ditengine_breakdown(model, noise, labels, dtype: torch.dtype, cfg_scale: float, steps: int, runs: int) -> dict:
    """Self CPU time per category over `runs` fused steps (conditioning precomputed, as `fused+precond`)."""
    sched = de.schedulers.DDIM(steps, timestep_spacing="trailing", clip_sample=False)
    sampler = de.FastSampler(model, sched, cfg_scale=cfg_scale, dtype=dtype, cuda_graph=None)
    cond = sampler.fast.inputs(model, noise, sampler.use_cfg, labels)
    plan = sampler.plan(noise.shape, cond)
    plan.prepare(noise, cond)
    for _ in range(3):
        plan.step_body(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            plan.step_body(0)
    times, kernels = defaultdict(float), defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        category = categorise(event.key, TORCH_RULES)
        ms = event.self_cpu_time_total / 1e3 / runs
        times[category] += ms
        if category == "GEMM" and ms > 0:
            kernels[f"{event.key} {event.input_shapes}"] += ms
    return summary(times, kernels)


def openvino_breakdown(model, noise, labels, cfg_scale: float, precision: str, runs: int, workdir: pathlib.Path,
                       threads: int) -> dict:
    """OpenVINO's per-node real time per category over `runs` inferences of the CFG-doubled batch."""
    ov = peers._require("openvino")
    use_cfg = cfg_scale != 1.0
    graph = dit_peer_graph(model, labels, use_cfg)
    x_in = torch.cat([noise] * (2 if use_cfg else 1))
    t = torch.full((len(x_in),), 500.0)
    path, _ = peers.export_onnx(graph, x_in, t, workdir)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    feeds = {"x": x_in.numpy(), "t": t.numpy(), "y": graph.fixed["y"].numpy()}
    for _ in range(3):
        request.infer(feeds)
    times, kernels = defaultdict(float), defaultdict(float)
    for _ in range(runs):
        request.infer(feeds)
        for node in request.get_profiling_info():
            ms = node.real_time.total_seconds() * 1e3 / runs
            category = categorise(node.node_type, OPENVINO_RULES)
            times[category] += ms
            if category == "GEMM":
                kernels[f"{node.node_type} {node.exec_type}"] += ms
    return summary(times, kernels)


def summary(times: dict, kernels: dict) -> dict:
    total = sum(times.values()) or 1.0
    return {"total_ms": total,
            "categories": {c: {"ms": times.get(c, 0.0), "share": times.get(c, 0.0) / total} for c in CATEGORIES},
            "gemm_kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])}


def format_breakdown(report: dict) -> str:
    sides = [s for s in ("ditengine", "openvino") if s in report]
    lines = [f"{report['model']}, latent {report['latent']}, {report['precision']}, cfg {report['cfg_scale']} | "
             f"{report['cpu']} | {report['threads']} threads", "",
             "| category | " + " | ".join(f"{s} ms | {s} share" for s in sides) + " |",
             "|---|" + "---:|---:|" * len(sides)]
    for c in CATEGORIES:
        cells = " | ".join(f"{report[s]['categories'][c]['ms']:.2f} | {100 * report[s]['categories'][c]['share']:.0f}%"
                           for s in sides)
        lines.append(f"| {c} | {cells} |")
    lines.append("| total | " + " | ".join(f"{report[s]['total_ms']:.2f} | 100%" for s in sides) + " |")
    for s in sides:
        lines += ["", f"{s}: GEMM kernels by time", ""]
        lines += [f"- {ms:.2f} ms  {name}" for name, ms in report[s]["gemm_kernels"].items()]
    if "openvino_skipped" in report:
        lines += ["", f"openvino skipped: {report['openvino_skipped']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditengine.bench.breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--depth", type=int)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    overrides = {"input_size": args.input_size} | ({"depth": args.depth} if args.depth else {})
    model = de.DiT(de.DiTConfig.from_name(args.model, **overrides)).eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, model.config.in_channels, args.input_size, args.input_size, generator=g)
    labels = torch.randint(0, model.config.num_classes, (1,), generator=g)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from .timing import environment

    report = {"model": args.model, "latent": f"{args.input_size}x{args.input_size}", "precision": args.dtype,
              "cfg_scale": args.cfg_scale, "cpu": environment(torch.device("cpu"))["device"],
              "threads": torch.get_num_threads()}
    with torch.inference_mode():
        report["ditengine"] = ditengine_breakdown(model, noise, labels, dtype, args.cfg_scale, 5, args.runs)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            report["openvino"] = openvino_breakdown(model, noise, labels, args.cfg_scale, args.dtype, args.runs,
                                                    pathlib.Path(workdir), torch.get_num_threads())
    except peers.PeerUnavailable as reason:
        report["openvino_skipped"] = str(reason)
    print(format_breakdown(report))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
