"""CPU runtime peers: a family's fp32 model (the reference DiT, diffusers' PixArt transformer) exported to ONNX and
run by other inference runtimes. What is exported is a `PeerGraph`, built by the family's bench module: the model
as its pipeline calls it on the CFG-doubled batch, with the latents and timesteps as the inputs that change every
step and the conditioning (class labels; text embeddings and their mask) fed unchanged.

    onnxruntime-fp32  ONNX Runtime, CPU provider, every graph optimisation (ORT_ENABLE_ALL)
    onnxruntime-int8  ... after `quantize_dynamic`: int8 weights per output channel, activations quantised
                      at run time, MatMul/Gemm only; the rest stays fp32. This is ORT's documented
                      recipe for transformers on CPU, and it needs no calibration data.
    openvino-fp32     OpenVINO's CPU plugin on the same ONNX file, f32 inference forced
    openvino-bf16     ... with bf16 inference (`INFERENCE_PRECISION_HINT` bf16): the plugin's own default on a
                      CPU with bf16 dot instructions (AVX-512 bf16, AMX), the peer of ditengine's bf16 rows
    openvino-int8     ... after nncf's data-free int8 weight compression (INT8_SYM, the mode OpenVINO
                      pairs with dynamic int8 quantisation of activations), the counterpart of the ORT row;
                      the rest of the graph in bf16 where the CPU has bf16 dot instructions, else f32, as
                      ditengine's int8 rows keep their other ops in the ladder's low-precision dtype

Fairness: every peer runs on the same intra-op thread count as torch (`torch.get_num_threads()` unless
told otherwise), one inference at a time. Every OpenVINO row asks for its inference precision and checks
that the plugin took it (it silently infers in bf16 on CPUs with avx512_bf16 or AMX unless told otherwise).
The int8 rows quantise only what their runtime's own tooling quantises by default for this recipe.

The runtimes are optional (`pip install 'ditengine[peers]'`): they are imported when a peer is built,
and a missing one raises `PeerUnavailable` with the reason, for the caller to report and skip.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import shutil
import warnings
from typing import Callable

import torch

PEERS = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-int8")
STEP_INPUTS = ("x", "t")  # the latents and the timesteps: new on every step
INSTALL_HINT = "pip install 'ditengine[peers]'"
NNCF_MISSING = "openvino-int8 needs nncf (pip install nncf), which is not installed"

Forward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class PeerUnavailable(RuntimeError):
    """Raised with a one-line human reason (e.g. "onnxruntime is not installed (pip install 'ditengine[peers]')")."""


def _require(module: str, reason: str | None = None):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(reason or f"{module} is not installed ({INSTALL_HINT})") from err


@dataclasses.dataclass
class PeerGraph:
    """What a runtime peer runs: `module(x, t, *fixed.values())` -> the model output (fp32), on the CFG-doubled batch:
    x (N, ...) fp32 latents and t (N,) fp32 timesteps, new every step; `fixed`, the conditioning by input name (class
    labels, text embeddings, masks), fed unchanged on every run. The module is exported as it is (fp32, eval)."""

    module: torch.nn.Module
    fixed: dict[str, torch.Tensor]

    def input_names(self) -> list[str]:
        return [*STEP_INPUTS, *self.fixed]


def _as_numpy(tensor: torch.Tensor, dtype: torch.dtype | None = None):
    """A view, not a copy, whenever the tensor is already a contiguous CPU tensor of `dtype` (default its own)."""
    return tensor.detach().to("cpu", dtype or tensor.dtype).contiguous().numpy()


def _fixed_feeds(graph: PeerGraph) -> dict:
    """The conditioning's numpy arrays, made once per peer."""
    return {name: _as_numpy(tensor) for name, tensor in graph.fixed.items()}


def _feeds(x_in: torch.Tensor, t: torch.Tensor, fixed: dict) -> dict:
    return {"x": _as_numpy(x_in, torch.float32), "t": _as_numpy(t, torch.float32), **fixed}


def _cache_key(graph: PeerGraph, x_in: torch.Tensor, t: torch.Tensor) -> str:
    # The weights are part of the key: two models of one structure (a checkpoint, a random init) must not share a
    # file. The module's repr names its layers and their sizes; the inputs' shapes and dtypes fix the graph.
    digest = hashlib.blake2b(digest_size=16)
    inputs = {"x": x_in, "t": t, **graph.fixed}
    digest.update(json.dumps({"module": repr(graph.module), "torch": torch.__version__,
                              "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in inputs.items()}},
                             sort_keys=True).encode())
    for name, tensor in graph.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def export_onnx(graph: PeerGraph, x_in: torch.Tensor, t: torch.Tensor, workdir: pathlib.Path):
    """The fp32 ONNX file of `graph` at these input shapes, exported once per weights and shapes into
    `workdir`. Returns (path, exporter) with exporter "dynamo" or "torchscript" (the fallback)."""
    folder = pathlib.Path(workdir) / f"{type(graph.module).__name__.lower()}-{_cache_key(graph, x_in, t)}"
    if not (folder / "model.onnx").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(f".{folder.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        module = graph.module.eval()
        args = (x_in.detach().float().cpu(), t.detach().float().cpu(),
                *(v.detach().cpu() for v in graph.fixed.values()))
        names = dict(input_names=graph.input_names(), output_names=["out"])
        exporter = "dynamo"
        with torch.no_grad():
            try:
                torch.onnx.export(module, args, staging / "model.onnx", **names, dynamo=True, verbose=False)
                # ONNX's strict shape inference, as ONNX Runtime runs it on load: the new exporter writes a Squeeze
                # of a dimension that is not 1 for torch's no-op `squeeze(1)` (diffusers' PixArt output).
                importlib.import_module("onnx").checker.check_model(staging / "model.onnx", full_check=True)
            except Exception as err:  # the new exporter still misses some graphs the old one handles
                warnings.warn(f"torch.onnx.export(dynamo=True) failed ({type(err).__name__}: {err}); "
                              "falling back to the TorchScript exporter")
                exporter = "torchscript"
                shutil.rmtree(staging)
                staging.mkdir()
                torch.onnx.export(module, args, staging / "model.onnx", **names, dynamo=False, opset_version=18)
        (staging / "exporter.txt").write_text(exporter)
        try:
            os.replace(staging, folder)  # atomic: a concurrent or interrupted export leaves no half file
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return folder / "model.onnx", (folder / "exporter.txt").read_text()


def quantize_onnx(fp32_path: pathlib.Path) -> pathlib.Path:
    """ORT's dynamic int8 quantisation of the fp32 file, made once beside it: QInt8 weights per output
    channel for every MatMul and Gemm with a constant weight (the attention's activation products stay fp32).

    ORT's `quant_pre_process` is not run: torch's exporter already records every shape, so with it the
    same nodes are quantised (5 per block, 4 outside) at no measurable speed-up, for seconds of setup."""
    quantization = _require("onnxruntime.quantization", f"onnxruntime is not installed ({INSTALL_HINT})")
    target = fp32_path.with_name("model.int8.onnx")
    if not target.exists():
        partial = target.with_name(f".{os.getpid()}.{target.name}")
        quantization.quantize_dynamic(fp32_path, partial, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                                      weight_type=quantization.QuantType.QInt8)
        os.replace(partial, target)
    return target


def _ort_session(ort, path: pathlib.Path, threads: int, profile_prefix: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnxruntime_forward(path: pathlib.Path, graph: PeerGraph, threads: int) -> Forward:
    session = _ort_session(_require("onnxruntime"), path, threads)
    fixed = _fixed_feeds(graph)

    def forward(x_in: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return torch.from_numpy(session.run(None, _feeds(x_in, t, fixed))[0])

    return forward


def bf16_dot_instructions() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 bf16 or AMX): where it does not, bf16 is emulated and
    a bf16 row measures the emulation, not the precision."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _openvino_forward(path: pathlib.Path, graph: PeerGraph, threads: int, precision: str) -> Forward:
    ov = _require("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    if precision == "int8":
        nncf = _require("nncf", NNCF_MISSING)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
    inference = "bf16" if precision == "bf16" or precision == "int8" and bf16_dot_instructions() else "f32"
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                  "INFERENCE_PRECISION_HINT": inference, "PERFORMANCE_HINT": "LATENCY"})
    took = compiled.get_property("INFERENCE_PRECISION_HINT")
    if took != getattr(ov.Type, inference):
        raise PeerUnavailable(f"OpenVINO compiled the model for {took}, not the {inference} that was asked for")
    request = compiled.create_infer_request()
    fixed = _fixed_feeds(graph)

    def forward(x_in: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        # share_inputs: the runtime reads the numpy buffers in place; outputs are copied out (the default)
        # so a caller that keeps an earlier step's output does not see it overwritten.
        result = request.infer(_feeds(x_in, t, fixed), share_inputs=True)
        return torch.from_numpy(result[0])

    return forward


def peer_forward(name: str, graph: PeerGraph, x_in: torch.Tensor, t: torch.Tensor, workdir: pathlib.Path,
                 threads: int | None = None) -> Forward:
    """Export/compile once, return forward(x_in, t, step) -> torch fp32 tensor (graph.module(x_in, t, *fixed)).
    x_in (N, ...) fp32 latents and t (N,) float timesteps of the CFG-doubled model batch, the shapes every later
    call feeds; the graph's conditioning is fed unchanged on every run.
    threads: intra-op threads (default torch.get_num_threads()), so peers and torch use the same cores."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")
    runtime, precision = name.split("-")
    # The runtime (and nncf) are checked before the export, so a missing package costs no export time.
    _require(runtime)
    if name == "openvino-int8":
        _require("nncf", NNCF_MISSING)
    threads = threads or torch.get_num_threads()
    path, _ = export_onnx(graph, x_in, t, workdir)
    if runtime == "onnxruntime":
        return _onnxruntime_forward(quantize_onnx(path) if precision == "int8" else path, graph, threads)
    return _openvino_forward(path, graph, threads, precision)

