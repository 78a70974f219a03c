"""The NCCL path of sequence parallelism on one device: `bash bench/gpu_check.sh --parallel OUTDIR` ends with it.

    python -m torch.distributed.run --standalone --nproc_per_node 1 -m ditengine.bench.nccl_check OUT \\
        [--single DIR --nccl DIR] [--device cpu]

Only one GPU is ever lent, so the proof runs at world size 1: `ParallelConfig()` on a one-rank group binds a
one-rank sequence group, and the sequence-parallel path (the all-to-alls around each self-attention, the all-gather
of the projected rows) runs through NCCL inside the whole-loop CUDA graph. Two parts:

- the ladder's two runs of the same row, one process (`--single`, the folder `python -m ditengine.bench` wrote) and
  under a one-rank torchrun with `--ulysses-degree 1` (`--nccl`): their ms/step and the ratio, what the collectives
  cost; the ladder keeps no latents, only each run's error against its fp32 reference, so those are shown but
  prove nothing about agreement;
- its own comparison, which does: a tiny DiT in fp32 sampled with `parallel=ParallelConfig()` and with
  `parallel=None`, in the whole-loop graph on CUDA (NCCL) or eagerly on a CPU (gloo, what the CPU test runs); they
  agree when bitwise equal or their max error relative to the latents' largest magnitude is at most 1e-5. One more
  eager run of the layout, under the profiler, counts the collectives it issues (c10d's ops).

Writes OUT/nccl-check.json and OUT/nccl-check.md (one line); exit 1 when a ladder report is missing, the latents do
not agree, the loop was not captured on CUDA, or the sequence path did not run (no sequence group bound, or no
collective issued: a plain run proves nothing).
The group comes from torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ditengine as de

ROW = "fused+graph-loop"
TOLERANCE = 1e-5
# The comparison's DiT: 4 blocks, 2 heads, 16 tokens (an 8 x 8 latent in 2 x 2 patches); seconds on a CPU.
TINY = dict(name="DiT-T/2", input_size=8, num_classes=10, steps=4, batch=2, cfg_scale=4.0)


def newest_report(folder: Path) -> dict | None:
    """The ladder's final report in `folder`, else the partial one a cut-off run left."""
    files = sorted(folder.glob("bench-*.json"), key=lambda p: ("partial" in p.name, -p.stat().st_mtime))
    return json.loads(files[0].read_text()) if files else None


def ladder_row(folder: Path | None) -> dict | None:
    """The ROW of a ladder run: ms/step and its spread, and its error against the run's fp32 reference."""
    report = newest_report(folder) if folder is not None and folder.is_dir() else None
    row = next((r for r in report["results"] if r["variant"] == ROW), None) if report else None
    if row is None:
        return None
    keep = ("variant", "batch", "dtype", "median_ms", "p20_ms", "p80_ms", "setup_s", "new_shape_s", "max_err",
            "sqnr_db")
    return {**{k: row.get(k) for k in keep}, "model": report["model"], "parallel": report.get("parallel"),
            "device": report["env"]["device"]}


def compare(device: torch.device) -> dict:
    """The tiny DiT's latents with `parallel=ParallelConfig()` against `parallel=None`, on the initialised group."""
    torch.manual_seed(0)
    cfg = de.DiTConfig.from_name(TINY["name"], input_size=TINY["input_size"], num_classes=TINY["num_classes"])
    model = de.DiT(cfg).eval().to(device)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(TINY["batch"], cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(device)
    labels = torch.randint(0, TINY["num_classes"], (TINY["batch"],), generator=g).to(device)
    mode = "loop" if device.type == "cuda" else None  # on a CPU the loop graph's runner would run eagerly anyway

    def sampler(parallel, cuda_graph):
        return de.FastSampler(model, de.schedulers.DDIM(TINY["steps"], timestep_spacing="trailing"),
                              cfg_scale=TINY["cfg_scale"], dtype=torch.float32, cuda_graph=cuda_graph,
                              parallel=parallel)

    want = sampler(None, mode)(noise, labels)
    collectives = issued_collectives(lambda: sampler(de.ParallelConfig(), None)(noise, labels))
    parallel = sampler(de.ParallelConfig(), mode)
    got = parallel(noise, labels)
    runner = parallel._plans[parallel.last_plan].runner
    sequence = parallel.sequence
    err = float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
    bitwise = torch.equal(got, want)
    return {"model": f"{TINY['name']}, {cfg.depth} blocks, {(cfg.input_size // cfg.patch_size) ** 2} tokens",
            "dtype": "fp32", "steps": TINY["steps"], "batch": TINY["batch"], "cuda_graph": mode,
            "captured": runner is not None and runner.graph is not None,
            "sequence_group": None if sequence is None else sequence.size, "collectives": collectives,
            "bitwise": bitwise, "max_rel_err": err, "agree": bitwise or err <= TOLERANCE}


def issued_collectives(run) -> dict | str:
    """The c10d collectives `run` issues ({op: count}), counted by the profiler on an eager run (not inside a graph
    capture, where the profiler has no business); a profiler that fails leaves its reason instead."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    except Exception as err:  # the sequence group bound still says which path ran
        return f"not counted ({type(err).__name__}: {err})"
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("c10d::"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def verdict(result: dict) -> list[str]:
    """What keeps the check from proving the path; empty when it proves it."""
    c = result["comparison"]
    problems = [f"no {ROW} row in the {name} ladder run" for name in ("single", "nccl")
                if result["wanted_ladder"] and result[name] is None]
    if "error" in c:
        problems.append(f"the comparison raised {c['error']}")
        return problems
    if c["sequence_group"] is None:
        problems.append("the sequence path did not run: ParallelConfig() at world size 1 bound no sequence group, "
                        "so both runs took the plain path")
    elif isinstance(c["collectives"], dict) and not c["collectives"]:
        problems.append("the sequence group was bound but the run issued no collective")
    if not c["agree"]:
        problems.append(f"the latents differ: max relative error {c['max_rel_err']:.2e} > {TOLERANCE:g}")
    if c["cuda_graph"] == "loop" and not c["captured"]:
        problems.append("the loop was not captured as a CUDA graph")
    return problems


def markdown(result: dict) -> str:
    c = result["comparison"]
    single, nccl = result["single"], result["nccl"]
    if single and nccl:
        timing = (f"{ROW} {single['model']} batch {single['batch']} {single['dtype']}: {single['median_ms']:.3f} "
                  f"ms/step in one process, {nccl['median_ms']:.3f} under a one-rank torchrun "
                  f"({result['ratio']:.3f}x)")
    elif result["wanted_ladder"]:
        timing = (f"ladder: single {'-' if single is None else format(single['median_ms'], '.3f')} ms/step, "
                  f"nccl {'-' if nccl is None else format(nccl['median_ms'], '.3f')} ms/step (a run missing)")
    else:
        timing = "no ladder runs given"
    if "error" in c:
        latents = f"comparison failed: {c['error']}"
    else:
        how = "bitwise" if c["bitwise"] else f"max rel err {c['max_rel_err']:.2e}"
        graph = "" if c["cuda_graph"] is None else (", loop captured" if c["captured"] else ", loop NOT captured")
        bound = "no sequence group bound" if c["sequence_group"] is None else "sequence group of 1 rank bound"
        counted = c["collectives"]
        if isinstance(counted, dict):
            bound += "; collectives in an eager run: " + (", ".join(f"{n} {op.removeprefix('c10d::')}"
                                                                    for op, n in sorted(counted.items())) or "none")
        latents = (f"latents {'agree' if c['agree'] else 'DIFFER'} ({how}; {c['model']}, {c['dtype']}; {bound}"
                   f"{graph})")
    status = "proven" if not result["problems"] else "NOT proven: " + "; ".join(result["problems"])
    return f"{result['backend']} at world size {result['world_size']}: {timing}; {latents}. {status}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for nccl-check.json and nccl-check.md")
    p.add_argument("--single", type=Path, help="the ladder's one-process output folder")
    p.add_argument("--nccl", type=Path, help="the ladder's output folder under torchrun with --ulysses-degree 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if (args.single is None) != (args.nccl is None):
        p.error("--single and --nccl go together: the two ladder runs to set side by side")
    if "MASTER_ADDR" not in os.environ:
        p.error("launch under torchrun (python -m torch.distributed.run --standalone --nproc_per_node 1 -m "
                "ditengine.bench.nccl_check ...): the group comes from its environment")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        result = {"backend": backend, "world_size": dist.get_world_size(), "device": str(device),
                  "wanted_ladder": args.single is not None, "single": ladder_row(args.single),
                  "nccl": ladder_row(args.nccl)}
        single, nccl = result["single"], result["nccl"]
        # above 1: what the collectives and the sharded path cost a step at world size 1
        result["ratio"] = nccl["median_ms"] / single["median_ms"] if single and nccl else None
        try:
            result["comparison"] = compare(device)
        except Exception as err:  # recorded: a failed capture or collective is the finding this check exists for
            result["comparison"] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        dist.destroy_process_group()
    result["problems"] = verdict(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nccl-check.json").write_text(json.dumps(result, indent=2, default=str))
    line = markdown(result)
    (args.out / "nccl-check.md").write_text(line + "\n")
    print(line)
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
