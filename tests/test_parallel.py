"""Past one device, on gloo: CPU processes run CFG parallel (`ParallelConfig(cfg_degree=2)`), Ulysses
(`ulysses_degree=2`) and both at once, and must return, on every rank, the latents a single process's `FastSampler`
returns; and the bad configurations are refused by name."""
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ditengine as de

# The families whose conformance case guides (ACE-Step's turbo and Flux's embedded guidance run no CFG batch).
GUIDED = ("dit", "pixart", "sd3", "wan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, work, world: int, port: int, out: str, args: tuple) -> None:
    """One spawned rank: the tests importable, one thread, the gloo group around `work(rank, world, out, *args)`."""
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        work(rank, world, out, *args)
    finally:
        dist.destroy_process_group()


def spawn(work, out: str, *args, ranks: int = 2) -> None:
    """`work` on `ranks` gloo processes, each writing what it found under `out`."""
    mp.start_processes(_rank, args=(work, ranks, free_port(), out, args), nprocs=ranks, join=True,
                       start_method="spawn")


def save_runs(cases: dict, parallel, rank: int, out: str) -> None:
    """Each case's latents under `parallel`, eager and in loop mode, saved for the parent process."""
    for name, (model, sched, noise, args, named, cfg) in cases.items():
        for mode in (None, "loop"):
            got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                 parallel=parallel)(noise, *args, **named)
            torch.save(got, os.path.join(out, f"{name}-{mode}-{rank}.pt"))


def assert_every_rank_equals_one_process(cases: dict, out: str, ranks: int = 2) -> None:
    """The latents each rank saved (eager and loop mode) against one process's `FastSampler`: fp32, <= 1e-5."""
    for name, (model, sched, noise, args, named, cfg) in cases.items():
        want = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
        for mode in (None, "loop"):
            for rank in range(ranks):
                got = torch.load(os.path.join(out, f"{name}-{mode}-{rank}.pt"))
                err = float((got - want).norm() / want.norm())
                assert err <= 1e-5, (name, mode, rank, err)


def write_refusals(calls, path: str) -> None:
    """Each call's ValueError message ("ran" where it raised none), one a line, for the parent process to check."""
    messages = []
    for call in calls:
        try:
            call()
            messages.append("ran")
        except ValueError as err:
            messages.append(str(err))
    with open(path, "w") as f:
        f.write("\n".join(messages))


def read_lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def guided_cases(names=GUIDED) -> dict:
    from test_conformance import CASES

    return {name: CASES[name]() for name in names}


def _cfg_parallel(rank: int, world: int, out: str) -> None:
    save_runs(guided_cases(), de.ParallelConfig(cfg_degree=2), rank, out)


def test_cfg_parallel_equals_one_process_on_every_rank():
    with tempfile.TemporaryDirectory() as out:
        spawn(_cfg_parallel, out)
        assert_every_rank_equals_one_process(guided_cases(), out)


def ulysses_cases() -> dict:
    """Each sharded family's case with head counts the degree 2 divides (PixArt's case has 3 heads)."""
    import test_pixart

    cases = guided_cases(("dit", "wan", "ace_step"))
    model = test_pixart.pixart(num_attention_heads=4, cross_attention_dim=64)
    cases["pixart"] = (model, de.schedulers.DPMSolverPP(4), test_pixart.noise(), (), test_pixart.conditioning(model),
                       4.5)
    return cases


def _ulysses(rank: int, world: int, out: str) -> None:
    import test_pixart

    parallel = de.ParallelConfig(ulysses_degree=world)
    save_runs(ulysses_cases(), parallel, rank, out)
    model, sched, noise, args, named, cfg = ulysses_cases()["wan"]
    calls = (lambda: de.FastSampler(model, sched, parallel=parallel)(noise[:, :, :, :2], *args, **named),
             lambda: de.FastSampler(test_pixart.pixart(), sched, parallel=parallel))  # 9 tokens; 3 heads
    write_refusals(calls, os.path.join(out, f"errors-{rank}.txt"))


def test_ulysses_equals_one_process_on_every_rank():
    """Ulysses degree 2 (every token count and head count here divisible): DiT, PixArt (a partial mask), Wan (3-D
    RoPE over every position) and ACE-Step (GQA, its sliding window) return the single process's latents."""
    with tempfile.TemporaryDirectory() as out:
        spawn(_ulysses, out)
        assert_every_rank_equals_one_process(ulysses_cases(), out)
        messages = read_lines(os.path.join(out, "errors-0.txt"))
        assert messages[0].startswith("noise: 9 tokens, which ulysses_degree=2 does not divide"), messages
        assert messages[1].startswith("parallel: ulysses_degree=2 must divide the attention's head counts (3,)")


def mesh_cases() -> dict:
    cases = ulysses_cases()
    return {name: cases[name] for name in ("dit", "wan")}


def _mesh(rank: int, world: int, out: str) -> None:
    save_runs(mesh_cases(), de.ParallelConfig(ulysses_degree=2, cfg_degree=2), rank, out)


def test_cfg_parallel_times_ulysses_on_four_ranks():
    """CFG 2 x Ulysses 2 on four gloo processes: each half of the rows on its own Ulysses pair; every rank returns
    the single process's latents."""
    with tempfile.TemporaryDirectory() as out:
        spawn(_mesh, out, ranks=4)
        assert_every_rank_equals_one_process(mesh_cases(), out, ranks=4)


def _pipeline(rank: int, world: int, out: str) -> None:
    import test_wan

    pipe = test_wan.wan_pipeline()  # every rank builds the pipeline
    fast = de.accelerate(pipe, parallel=de.ParallelConfig(cfg_degree=2))
    frames = fast(generator=torch.Generator().manual_seed(3), **test_wan.pipeline_call()).frames
    torch.save(frames, os.path.join(out, f"pipeline-{rank}.pt"))


def test_accelerate_with_cfg_parallel_returns_the_pipelines_latents_on_every_rank():
    pytest.importorskip("diffusers")
    import test_wan

    pipe = test_wan.wan_pipeline()
    expected = pipe(generator=torch.Generator().manual_seed(3), **test_wan.pipeline_call()).frames
    with tempfile.TemporaryDirectory() as out:
        spawn(_pipeline, out)
        for rank in (0, 1):
            got = torch.load(os.path.join(out, f"pipeline-{rank}.pt"))
            assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4, rank


def _refusals(rank: int, world: int, out: str) -> None:
    model, sched = guided_cases(("dit",))["dit"][:2]
    calls = [lambda parallel=parallel, scale=scale: de.FastSampler(model, sched, cfg_scale=scale, parallel=parallel)
             for parallel, scale in ((de.ParallelConfig(cfg_degree=1), 4.0), (de.ParallelConfig(cfg_degree=2), 1.0))]
    write_refusals(calls, os.path.join(out, f"refusals-{rank}.txt"))


def test_bad_configurations_are_refused_by_name():
    model, sched = guided_cases(("dit",))["dit"][:2]
    with pytest.raises(ValueError, match="parallel: no initialised torch.distributed process group"):
        de.FastSampler(model, sched, parallel=de.ParallelConfig(cfg_degree=2))
    with pytest.raises(ValueError, match="ParallelConfig: cfg_degree=3: expected 1 or 2"):
        de.ParallelConfig(cfg_degree=3)
    with pytest.raises(ValueError, match=r"ParallelConfig: ring_degree=0: expected an int >= 1"):
        de.ParallelConfig(ring_degree=0)
    with pytest.raises(NotImplementedError, match="ring_degree=2: Ring attention is not implemented yet"):
        de.ParallelConfig(ring_degree=2)
    with pytest.raises(ValueError, match="parallel needs backend='fused'"):
        de.sample(model, sched, torch.zeros(1), parallel=de.ParallelConfig())
    with tempfile.TemporaryDirectory() as out:
        spawn(_refusals, out)
        for rank in (0, 1):
            messages = read_lines(os.path.join(out, f"refusals-{rank}.txt"))
            assert messages[0].startswith("parallel: ulysses_degree x ring_degree x cfg_degree = 1, but the process "
                                          "group has 2 ranks"), messages
            assert messages[1].startswith("parallel: cfg_degree=2 splits the guided rows, but guidance is off")
