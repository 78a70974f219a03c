"""CUDA-graph capture behind a small runner whose eager form uses the same static buffers.

The body a runner wraps reads and writes only tensors allocated before capture (its static buffers), so
replaying the graph, or calling the body eagerly, does the same work on the same memory. On a CPU, or
with DITENGINE_CUDA_GRAPHS=0, the runner calls the body eagerly: the buffer handling around it is the
same, which is what lets a CPU test check it.
"""
from __future__ import annotations

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
    private memory pool shared by the graphs of one sampler.
    """

    def __init__(self, body, device: torch.device, pool=None, capture: bool = True):
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
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            body()
        torch.cuda.synchronize(device)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()
