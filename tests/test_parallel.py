"""Past one device, on gloo: two CPU processes run CFG parallel (`ParallelConfig(cfg_degree=2)`) and must return,
on every rank, the latents a single process's `FastSampler` returns; and the bad configurations are refused by
name."""
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


def _worker(rank: int, world: int, port: int, out_dir: str, names: tuple) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from test_conformance import CASES

        for name in names:
            model, sched, noise, args, named, cfg = CASES[name]()
            parallel = de.ParallelConfig(cfg_degree=2)
            for mode in (None, "loop"):
                got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                     parallel=parallel)(noise, *args, **named)
                torch.save(got, os.path.join(out_dir, f"{name}-{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_every_rank_equals_one_process(cases: dict, out: str, ranks: int = 2) -> None:
    """The latents each rank saved (eager and loop mode) against one process's `FastSampler`: fp32, <= 1e-5."""
    for name, (model, sched, noise, args, named, cfg) in cases.items():
        want = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
        for mode in (None, "loop"):
            for rank in range(ranks):
                got = torch.load(os.path.join(out, f"{name}-{mode}-{rank}.pt"))
                err = float((got - want).norm() / want.norm())
                assert err <= 1e-5, (name, mode, rank, err)


@pytest.mark.parametrize("names", [GUIDED])
def test_cfg_parallel_equals_one_process_on_every_rank(names):
    from test_conformance import CASES

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, free_port(), out, names), nprocs=2, join=True, start_method="spawn")
        assert_every_rank_equals_one_process({name: CASES[name]() for name in names}, out)


def ulysses_cases() -> dict:
    """Each sharded family's case with head counts the degree 2 divides (PixArt's case has 3 heads)."""
    import test_pixart
    from test_conformance import CASES

    cases = {name: CASES[name]() for name in ("dit", "wan", "ace_step")}
    model = test_pixart.pixart(num_attention_heads=4, cross_attention_dim=64)
    cases["pixart"] = (model, de.schedulers.DPMSolverPP(4), test_pixart.noise(), (), test_pixart.conditioning(model),
                       4.5)
    return cases


def _ulysses_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, (model, sched, noise, args, named, cfg) in ulysses_cases().items():
            for mode in (None, "loop"):
                got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                     parallel=de.ParallelConfig(ulysses_degree=world))(noise, *args, **named)
                torch.save(got, os.path.join(out_dir, f"{name}-{mode}-{rank}.pt"))
        import test_pixart

        model, sched, noise, args, named, cfg = ulysses_cases()["wan"]
        parallel = de.ParallelConfig(ulysses_degree=world)
        calls = (lambda: de.FastSampler(model, sched, parallel=parallel)(noise[:, :, :, :2], *args, **named),
                 lambda: de.FastSampler(test_pixart.pixart(), sched, parallel=parallel))  # 9 tokens; 3 heads
        write_refusals(calls, os.path.join(out_dir, f"errors-{rank}.txt"))
    finally:
        dist.destroy_process_group()


def test_ulysses_equals_one_process_on_every_rank():
    """Ulysses degree 2 (every token count and head count here divisible): DiT, PixArt (a partial mask), Wan (3-D
    RoPE over every position) and ACE-Step (GQA, its sliding window) return the single process's latents."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_ulysses_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
        assert_every_rank_equals_one_process(ulysses_cases(), out)
        with open(os.path.join(out, "errors-0.txt")) as f:
            messages = f.read().splitlines()
        assert messages[0].startswith("noise: 9 tokens, which ulysses_degree=2 does not divide"), messages
        assert messages[1].startswith("parallel: ulysses_degree=2 must divide the attention's head counts (3,)")


def _mesh_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, (model, sched, noise, args, named, cfg) in mesh_cases().items():
            for mode in (None, "loop"):
                got = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                     parallel=de.ParallelConfig(ulysses_degree=2, cfg_degree=2))(noise, *args, **named)
                torch.save(got, os.path.join(out_dir, f"{name}-{mode}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def mesh_cases() -> dict:
    cases = ulysses_cases()
    return {name: cases[name] for name in ("dit", "wan")}


def test_cfg_parallel_times_ulysses_on_four_ranks():
    """CFG 2 x Ulysses 2 on four gloo processes: each half of the rows on its own Ulysses pair; every rank returns
    the single process's latents."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_mesh_worker, args=(4, free_port(), out), nprocs=4, join=True, start_method="spawn")
        assert_every_rank_equals_one_process(mesh_cases(), out, ranks=4)


def _pipeline_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import test_wan

        pipe = test_wan.wan_pipeline()  # every rank builds the pipeline
        fast = de.accelerate(pipe, parallel=de.ParallelConfig(cfg_degree=2))
        frames = fast(generator=torch.Generator().manual_seed(3), **test_wan.pipeline_call()).frames
        torch.save(frames, os.path.join(out_dir, f"pipeline-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accelerate_with_cfg_parallel_returns_the_pipelines_latents_on_every_rank():
    pytest.importorskip("diffusers")
    import test_wan

    pipe = test_wan.wan_pipeline()
    expected = pipe(generator=torch.Generator().manual_seed(3), **test_wan.pipeline_call()).frames
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_pipeline_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
        for rank in (0, 1):
            got = torch.load(os.path.join(out, f"pipeline-{rank}.pt"))
            assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4, rank


def _refusals(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from test_conformance import CASES

        model, sched, noise, args, named, cfg = CASES["dit"]()
        calls = [lambda parallel=parallel, scale=scale: de.FastSampler(model, sched, cfg_scale=scale,
                                                                       parallel=parallel)
                 for parallel, scale in ((de.ParallelConfig(cfg_degree=1), 4.0),
                                         (de.ParallelConfig(cfg_degree=2), 1.0))]
        write_refusals(calls, os.path.join(out_dir, f"refusals-{rank}.txt"))
    finally:
        dist.destroy_process_group()


def test_bad_configurations_are_refused_by_name():
    from test_conformance import CASES

    model, sched = CASES["dit"]()[:2]
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
        mp.start_processes(_refusals, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
        for rank in (0, 1):
            with open(os.path.join(out, f"refusals-{rank}.txt")) as f:
                messages = f.read().splitlines()
            assert messages[0].startswith("parallel: ulysses_degree x ring_degree x cfg_degree = 1, but the process "
                                          "group has 2 ranks"), messages
            assert messages[1].startswith("parallel: cfg_degree=2 splits the guided rows, but guidance is off")
