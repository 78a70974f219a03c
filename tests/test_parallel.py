"""Past one device, on gloo: CPU processes run CFG parallel (`ParallelConfig(cfg_degree=2)`), Ulysses
(`ulysses_degree=2`) and both at once, and must return, on every rank, the latents a single process's `FastSampler`
returns; and the bad configurations are refused by name."""
import datetime
import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ditengine as de
from ditengine.cache import FirstBlockCache, StaticCache

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
    # A bounded wait: ranks that fall out of step (different cache decisions) fail instead of hanging the suite.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        work(rank, world, out, *args)
    finally:
        dist.destroy_process_group()


def spawn(work, out: str, *args, ranks: int = 2) -> None:
    """`work` on `ranks` gloo processes, each writing what it found under `out`."""
    mp.start_processes(_rank, args=(work, ranks, free_port(), out, args), nprocs=ranks, join=True,
                       start_method="spawn")


def save_runs(cases: dict, parallel, rank: int, out: str, **options) -> None:
    """Each case's latents and stats under `parallel` (and the sampler `options`), eager and in loop mode, saved for
    the parent process."""
    for name, (model, sched, noise, args, named, cfg) in cases.items():
        for mode in (None, "loop"):
            sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=mode,
                                     parallel=parallel, **options)
            got = sampler(noise, *args, **named)
            torch.save((got, sampler.stats), os.path.join(out, f"{name}-{mode}-{rank}.pt"))


def assert_every_rank_equals_one_process(cases: dict, out: str, ranks: int = 2, **options) -> None:
    """The latents each rank saved (eager and loop mode) against one process's `FastSampler` with the same
    `options`: fp32, relative error <= 1e-5; and the same cached steps."""
    for name, (model, sched, noise, args, named, cfg) in cases.items():
        one = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None, **options)
        want = one(noise, *args, **named)
        assert "cache" not in options or one.stats["cached_steps"], (name, "the cache skipped nothing")
        for mode in (None, "loop"):
            for rank in range(ranks):
                got, stats = torch.load(os.path.join(out, f"{name}-{mode}-{rank}.pt"))
                err = float((got - want).norm() / want.norm())
                assert err <= 1e-5, (name, mode, rank, err)
                assert stats["cached_steps"] == one.stats["cached_steps"], (name, mode, rank, stats)


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


def sequence_cases() -> dict:
    """Every family's case with head counts 2 divides: DiT (16 tokens), PixArt (a partial mask), SD3.5 (per-stream
    q/k norms over [image; text], a dual-attention layer's image-only attention, 19 tokens: padded), Flux ([text;
    image], RoPE over both, 19 tokens: padded), ACE-Step (GQA, a window of 4 on every other layer, 12 tokens), Wan
    (3-D RoPE, 18 tokens)."""
    import test_pixart
    import test_sd3

    cases = guided_cases(("dit", "wan", "ace_step", "flux"))
    model = test_pixart.pixart(num_attention_heads=4, cross_attention_dim=64)
    cases["pixart"] = (model, de.schedulers.DPMSolverPP(4), test_pixart.noise(), (), test_pixart.conditioning(model),
                       4.5)
    model = test_sd3.sd3(dual_attention_layers=(1,))
    cases["sd3"] = (model, test_sd3.schedule(), test_sd3.noise(), (), test_sd3.conditioning(model), 3.0)
    return cases


def wan_shards() -> dict:
    """Wan with 9 tokens (over four ring chunks of 3, the last chunk is all padding), and TI2V's held first frame
    (its 6 tokens at t = 0: on rank 0 and part of rank 1's shard)."""
    import test_wan

    model, sched, noise, args, named, cfg = guided_cases(("wan",))["wan"]
    return {"wan9": (model, sched, noise[:, :, :, :2], args, named, cfg),
            "ti2v": (model, sched, noise, args, test_wan.ti2v_conditioning(model), cfg)}


def guided_ace_step() -> dict:
    """ACE-Step with guidance (APG's sequence latents)."""
    import test_ace_step

    model = test_ace_step.ace_step()
    return {"ace_step": (model, test_ace_step.schedule(), test_ace_step.noise(), (),
                         test_ace_step.conditioning(model, guided=True), 3.0)}


def guided_sequence_cases() -> dict:
    """Every family guided: the sequence cases, Flux with true CFG (a negative prompt), ACE-Step with guidance."""
    import test_flux

    cases = sequence_cases()
    model, sched, noise = cases["flux"][:3]
    cases["flux"] = (model, sched, noise, (), test_flux.conditioning(model, negative=True), 4.0)
    return cases | guided_ace_step()


# The layouts each world size runs: (parallel, the cases, the sampler's options). CFG parallel runs the guided cases.
CACHES = {"first-block": FirstBlockCache(threshold=1.0), "static": StaticCache(2, warmup=1, cooldown=1),
          "blocks": StaticCache(2, warmup=1, cooldown=1, reuse="blocks")}
LAYOUTS = {
    2: {"ulysses": (de.ParallelConfig(ulysses_degree=2), sequence_cases, {}),
        "ring": (de.ParallelConfig(ring_degree=2), sequence_cases, {}),
        **{f"ring-{name}": (de.ParallelConfig(ring_degree=2), lambda: guided_cases(("dit",)), {"cache": cache})
           for name, cache in CACHES.items()},
        "ulysses-first-block": (de.ParallelConfig(ulysses_degree=2), lambda: {"flux": sequence_cases()["flux"]},
                                {"cache": CACHES["first-block"]}),
        "cfg-apg": (de.ParallelConfig(cfg_degree=2), guided_ace_step, {"guider": de.APG()})},
    4: {"ulysses-ring": (de.ParallelConfig(ulysses_degree=2, ring_degree=2), sequence_cases, {}),
        "cfg-ulysses": (de.ParallelConfig(ulysses_degree=2, cfg_degree=2), guided_sequence_cases, {}),
        "ring4": (de.ParallelConfig(ring_degree=4), wan_shards, {})},
    8: {"cfg-ulysses-ring": (de.ParallelConfig(ulysses_degree=2, ring_degree=2, cfg_degree=2),
                             lambda: {k: v for k, v in guided_sequence_cases().items() if k in ("dit", "flux")}, {})},
}


def _layouts(rank: int, world: int, out: str) -> None:
    for layout, (parallel, cases, options) in LAYOUTS[world].items():
        os.makedirs(os.path.join(out, layout), exist_ok=True)
        save_runs(cases(), parallel, rank, os.path.join(out, layout), **options)


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_sequence_parallel_equals_one_process_on_every_rank(world):
    """Ulysses 2 and Ring 2 on two gloo processes; Ulysses 2 x Ring 2, CFG 2 x Ulysses 2 (every family guided) and
    Ring 4 (an all-padding chunk) on four; CFG 2 x Ulysses 2 x Ring 2 on eight (DiT, Flux): every family returns the
    single process's latents on every rank, token counts that do not divide (Flux's 19, SD3's 19, Wan's 9)
    included. With a step cache (first-block: its statistic reduced over the ranks; static) every rank caches the
    single process's steps; APG runs on the gathered halves."""
    with tempfile.TemporaryDirectory() as out:
        spawn(_layouts, out, ranks=world)
        for layout, (_, cases, options) in LAYOUTS[world].items():
            assert_every_rank_equals_one_process(cases(), os.path.join(out, layout), ranks=world, **options)


def _sequence_refusals(rank: int, world: int, out: str) -> None:
    import test_pixart

    model, sched, noise, args, named, cfg = sequence_cases()["ace_step"]
    calls = (lambda: de.FastSampler(test_pixart.pixart(), sched, parallel=de.ParallelConfig(ulysses_degree=world)),
             lambda: de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None,
                                    parallel=de.ParallelConfig(ring_degree=world))(
                 noise[..., :12], *args, **named | {"context_latents": named["context_latents"][..., :12]}))
    write_refusals(calls, os.path.join(out, f"errors-{rank}.txt"))


def test_sequence_parallel_refusals_are_named():
    """A head count the Ulysses degree does not divide; a sliding window wider than a ring chunk (ACE-Step's 4 over
    chunks of 3: only neighbouring chunks' keys are exchanged)."""
    with tempfile.TemporaryDirectory() as out:
        spawn(_sequence_refusals, out)
        messages = read_lines(os.path.join(out, "errors-0.txt"))
        assert messages[0].startswith("parallel: ulysses_degree=2 must divide the attention's head counts (3,)")
        assert messages[1].startswith("parallel: ring_degree=2: a sliding window of 4 tokens is wider than a ring "
                                      "chunk (3 tokens)"), messages


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


def _demo(rank: int, world: int, out: str) -> None:
    from support.diffusers_models import text_embeddings
    from test_flux_pipeline import tiny_flux_pipeline

    from ditengine.demo.parallel import run

    wrote = run(tiny_flux_pipeline(False), de.ParallelConfig(ulysses_degree=2), os.path.join(out, "image.png"),
                height=8, width=12, num_inference_steps=3, **text_embeddings())
    assert wrote == (rank == 0)


def test_the_demo_writes_the_pipelines_image_from_rank_0():
    """`ditengine.demo.parallel.run`: every rank builds the pipeline, Ulysses 2 runs Flux's transformer, rank 0
    writes the image the pipeline itself makes."""
    pytest.importorskip("diffusers")
    from PIL import Image
    from support.diffusers_models import text_embeddings
    from test_flux_pipeline import tiny_flux_pipeline

    want = tiny_flux_pipeline(False)(height=8, width=12, num_inference_steps=3,
                                     generator=torch.Generator().manual_seed(0), **text_embeddings()).images[0]
    with tempfile.TemporaryDirectory() as out:
        spawn(_demo, out)
        got = Image.open(os.path.join(out, "image.png"))
        import numpy as np

        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
        assert got.size == want.size and int(diff.max()) <= 1, int(diff.max())


@pytest.fixture
def one_rank_group():
    """A gloo group of one process, this one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_runs_the_sequence_path_and_takes_a_device_mesh(one_rank_group):
    """On a group of one rank `ParallelConfig()` still runs the sharded path, its collectives on one rank (what the
    GPU plan proves for NCCL inside the loop graph); a 1-D DeviceMesh names the group, a 2-D one is refused."""
    from torch.distributed.device_mesh import init_device_mesh

    model, sched, noise, args, named, cfg = sequence_cases()["flux"]
    want = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
    for group in (None, init_device_mesh("cpu", (1,))):
        sampler = de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph="loop",
                                 parallel=de.ParallelConfig(process_group=group))
        assert sampler.sequence is not None and sampler.sequence.size == 1
        got = sampler(noise, *args, **named)
        assert float((got - want).norm() / want.norm()) <= 1e-6
    with pytest.raises(ValueError, match="process_group: a 2-D DeviceMesh"):
        de.FastSampler(model, sched, parallel=de.ParallelConfig(process_group=init_device_mesh("cpu", (1, 1))))


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
    with pytest.raises(ValueError, match="parallel needs backend='fused'"):
        de.sample(model, sched, torch.zeros(1), parallel=de.ParallelConfig())
    with tempfile.TemporaryDirectory() as out:
        spawn(_refusals, out)
        for rank in (0, 1):
            messages = read_lines(os.path.join(out, f"refusals-{rank}.txt"))
            assert messages[0].startswith("parallel: ulysses_degree x ring_degree x cfg_degree = 1, but the process "
                                          "group has 2 ranks"), messages
            assert messages[1].startswith("parallel: cfg_degree=2 splits the guided rows, but guidance is off")
