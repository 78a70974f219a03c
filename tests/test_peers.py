"""The CPU runtime peers (ditengine.bench.peers) against the reference DiT they were exported from (PixArt's peers
run in test_cli's PixArt ladder)."""
import sys

import pytest
import torch

import ditengine as de
from ditengine.bench import peers
from ditengine.bench.dit import dit_peer_graph
from ditengine.bench.peers import PEERS, PeerUnavailable, peer_forward

# fp32 peers: the runtimes fuse ops and reorder fp32 reductions (GEMM blocking, LayerNorm, softmax), which
# moves the output by ~1e-6 of its range at this depth. 1e-4 leaves a wide margin for other CPUs' kernels
# yet still fails a silent bf16 inference: OpenVINO's default on this CPU is off by 1.7e-2 of the range.
FP32_TOLERANCE = 1e-4
# int8 and bf16 peers: 8-bit weights and activations (or bf16 roundings) through two blocks give a relative L2
# error of ~1e-2; an error under the fp32 bound would mean nothing was quantised (or inferred in bf16).
INT8_MAX_REL_L2 = 0.1

# torch's own exporter internals, not this code.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A tiny seeded DiT and a CFG-doubled batch of 2; one workdir for the module, so the ONNX file is
    exported once and every peer reads it (as the benchmark's cache does)."""
    torch.manual_seed(0)
    model = de.DiT(de.DiTConfig.from_name("DiT-S/2", input_size=8, depth=2)).eval()
    x_in = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500.0, 500.0])
    graph = dit_peer_graph(model, torch.tensor([1]), use_cfg=True)  # the class label, then the null label
    return model, x_in, t, graph, tmp_path_factory.mktemp("peers")


def build(name, workload):
    model, x_in, t, graph, workdir = workload
    try:
        return peer_forward(name, graph, x_in, t, workdir)
    except PeerUnavailable as err:
        pytest.skip(str(err))


def rel_l2(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", PEERS)
def test_peer_matches_reference(name, workload):
    model, x_in, t, graph, _ = workload
    y = graph.fixed["y"]
    forward = build(name, workload)
    later_x, later_t = torch.randn_like(x_in), torch.tensor([250.0, 250.0])
    first = forward(x_in, t, 0)
    # A second step with new latents and timesteps: t is a live input, and the first output is not a
    # buffer the runtime reuses.
    later = forward(later_x, later_t, 1)
    with torch.no_grad():
        refs = model(x_in, t, y), model(later_x, later_t, y)
    for out, ref in zip((first, later), refs):
        assert out.shape == ref.shape and out.dtype == torch.float32
        if name.endswith("fp32"):
            assert (out - ref).abs().max().item() <= FP32_TOLERANCE * ref.abs().max().item()
        else:
            assert FP32_TOLERANCE < rel_l2(out, ref) < INT8_MAX_REL_L2


def test_export_is_cached_per_weights(workload):
    model, x_in, t, graph, workdir = workload
    pytest.importorskip("onnx")
    path, exporter = peers.export_onnx(graph, x_in, t, workdir)
    written = path.stat().st_mtime_ns
    assert peers.export_onnx(graph, x_in, t, workdir) == (path, exporter)
    assert path.stat().st_mtime_ns == written and exporter in ("dynamo", "torchscript")
    other = dit_peer_graph(de.DiT(model.config).eval(), torch.tensor([1]), use_cfg=True)
    assert peers._cache_key(other, x_in, t) != peers._cache_key(graph, x_in, t)
    more_rows = dit_peer_graph(model, torch.tensor([1, 2]), use_cfg=True)
    assert peers._cache_key(more_rows, x_in, t) != peers._cache_key(graph, x_in, t)


# The TorchScript exporter's deprecation and its tracer's notes on shapes, which are fixed here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_export_falls_back_to_torchscript(workload, tmp_path, monkeypatch):
    model, x_in, t, graph, _ = workload
    ort = pytest.importorskip("onnxruntime")
    export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("unsupported graph")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with pytest.warns(UserWarning, match="TorchScript exporter"):
        path, exporter = peers.export_onnx(graph, x_in, t, tmp_path)
    assert exporter == "torchscript" and [p.name for p in tmp_path.iterdir()] == [path.parent.name]
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x_in.numpy(), "t": t.numpy(), "y": graph.fixed["y"].numpy()})[0]
    with torch.no_grad():
        ref = model(x_in, t, graph.fixed["y"])
    assert (torch.from_numpy(out) - ref).abs().max().item() <= FP32_TOLERANCE * ref.abs().max().item()


@pytest.mark.parametrize("name, hidden", [("onnxruntime-fp32", "onnxruntime"), ("onnxruntime-int8", "onnxruntime"),
                                          ("openvino-fp32", "openvino"), ("openvino-bf16", "openvino"),
                                          ("openvino-int8", "openvino"),
                                          ("openvino-int8", "nncf")])
def test_missing_package_is_unavailable(name, hidden, workload, monkeypatch):
    if hidden == "nncf":
        pytest.importorskip("openvino")  # without openvino, openvino is what the reason names
    _, x_in, t, graph, workdir = workload
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    with pytest.raises(PeerUnavailable, match=hidden):
        peer_forward(name, graph, x_in, t, workdir)


def test_unknown_peer_lists_the_names(workload):
    _, x_in, t, graph, workdir = workload
    with pytest.raises(ValueError, match="tensorrt-fp16") as err:
        peer_forward("tensorrt-fp16", graph, x_in, t, workdir)
    assert all(name in str(err.value) for name in PEERS)
