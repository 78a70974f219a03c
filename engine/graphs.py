"""CUDA-graph capture behind a small runner whose eager form uses the same static buffers.

The body a runner wraps reads and writes only tensors allocated before capture (its static buffers), so
replaying the graph, or calling the body eagerly, does the same work on the same memory. On a CPU, or
with DITENGINE_CUDA_GRAPHS=0, the runner calls the body eagerly: the buffer handling around it is the
same, which is what lets a CPU test check it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("ditengine")


def graphs_enabled() -> bool:
    return os.environ.get("DITENGINE_CUDA_GRAPHS", "1") != "0"


@functools.lru_cache(maxsize=None)
def _log_eager(reason: str) -> None:
    log.info("ditengine: CUDA graphs off (%s); the sampling loop runs eagerly on the same buffers", reason)


class GraphRunner:
    """Calls `body()`; on CUDA (graphs enabled) as a captured graph replay.

    Capture runs the body once on a side stream first (Triton autotuning, cuBLAS workspaces and lazy
    initialisation must happen outside capture), then records it into a graph drawing on `pool`, a
    private memory pool shared by the graphs of one sampler. With `control_flow`, the body's `torch.cond`
    calls are warmed up on both sides and captured as conditional nodes (see
    `conditional_capture_supported`).
    """

    def __init__(self, body, device: torch.device, pool=None, capture: bool = True, control_flow: bool = False):
        self.body = body
        self.graph = None
        if not capture:
            return
        if device.type != "cuda":
            _log_eager(f"device {device.type}")
            return
        if not graphs_enabled():
            _log_eager("DITENGINE_CUDA_GRAPHS=0")
            return
        self.graph = capture_graph(body, device, pool, control_flow)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()


def _control_flow_modes():
    """torch's dispatch modes that warm up both sides of a `torch.cond` and capture it as CUDA-graph
    conditional nodes; None where this torch has none."""
    try:
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode)
    except ImportError:
        return None
    return ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode


def capture_graph(body, device: torch.device, pool=None, control_flow: bool = False) -> "torch.cuda.CUDAGraph":
    """Warm `body` up on a side stream, then capture it; `control_flow`: its `torch.cond` calls become
    conditional nodes (both sides warmed up first, since a replay may take either)."""
    warmup_mode = capture_mode = contextlib.nullcontext
    if control_flow:
        modes = _control_flow_modes()
        if modes is None:
            raise RuntimeError("this torch cannot capture torch.cond into a CUDA graph")
        warmup_mode, capture_mode = modes
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), warmup_mode():
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), capture_mode():
        body()
    torch.cuda.synchronize(device)
    return graph


@functools.lru_cache(maxsize=None)
def _probe_conditional_capture(device: str) -> bool:
    if _control_flow_modes() is None:
        return False
    dev = torch.device(device)
    try:
        pred = torch.zeros((), dtype=torch.bool, device=dev)
        x = torch.arange(4.0, device=dev)
        out = torch.zeros(4, device=dev)

        def plus():
            out.copy_(x + 1)
            return ()

        def minus():
            out.copy_(x - 1)
            return ()

        graph = capture_graph(lambda: torch.ops.higher_order.cond(pred, plus, minus, ()), dev, control_flow=True)
        results = []
        for value in (True, False, True):
            pred.fill_(value)
            graph.replay()
            results.append(out.clone())
        torch.cuda.synchronize(dev)
        ok = all(torch.equal(r, x + (1 if v else -1)) for r, v in zip(results, (True, False, True)))
    except Exception as err:  # an older CUDA driver or torch: the two-graph fallback is used instead
        log.info("ditengine: capturing torch.cond into a CUDA graph failed on %s (%s: %s)", device,
                 type(err).__name__, err)
        return False
    log.info("ditengine: torch.cond %s captured as CUDA-graph conditional nodes on %s",
             "is" if ok else "gives wrong results when", device)
    return ok


def conditional_capture_supported(device: torch.device) -> bool:
    """Whether this torch and driver capture `torch.cond` into a CUDA graph as conditional nodes and replay
    both branches correctly on `device`; probed once per device with a tiny graph, the answer cached."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_conditional_capture(f"cuda:{index}")
