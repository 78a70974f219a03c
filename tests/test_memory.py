"""Memory at real width (Flux.1: 3072 wide, T5 4096; 1 double + 2 single blocks, 0.65 B parameters in bf16), each
step in a fresh process (`ditengine.bench.memory`): assertions on bytes, against the transformer's own bytes."""
import pytest
import torch

from ditengine.bench import memory
from ditengine.kernels.linear_swiglu import mkldnn_bf16

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow  # writes and reads a 1.3 GB checkpoint, ~40 s


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return memory.write_checkpoint(tmp_path_factory.mktemp("flux-real-width"), 1, 2)


def test_load_checkpoint_in_bf16_holds_one_copy(checkpoint):
    r = memory.run("load", checkpoint, 1, 2)
    assert r["dtypes"] == [str(torch.bfloat16)]
    assert r["peak"] <= 1.35 * r["weights"] and r["residue"] <= 1.1 * r["weights"], r


def test_from_diffusers_adds_nothing(checkpoint):
    r = memory.run("from_diffusers", checkpoint, 1, 2)
    assert r["residue"] <= 0.1 * r["weights"] and r["peak"] <= 0.1 * r["weights"], r


def test_accelerate_and_its_first_call_hold_one_packed_copy(checkpoint):
    r = memory.run("accelerate", checkpoint, 1, 2)
    # Where oneDNN runs bf16 GEMMs the packed weights stay bf16; elsewhere the CPU packs them as fp32.
    residue, peak = (1.2, 1.5) if mkldnn_bf16() else (2.2, 2.5)
    assert r["finite"] and r["residue"] <= residue * r["weights"] and r["peak"] <= peak * r["weights"], r


def test_release_transformer_leaves_little_beside_the_packed_copy(checkpoint):
    r = memory.run("accelerate_release", checkpoint, 1, 2)
    assert r["finite"] and r["residue"] <= (0.25 if mkldnn_bf16() else 0.85) * r["weights"], r
