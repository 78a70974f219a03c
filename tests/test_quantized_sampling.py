"""`quantize=`: the blocks' token GEMMs as W8A8 through FastSampler, sample(), accelerate and the CLIs."""

import pytest
import torch

import ditengine as de
from ditengine.bench.metrics import sqnr_db
from ditengine.fast import FastSampler
from ditengine.kernels import Fp8Linear, Int8Linear

from test_fast import draw, gpu_dit, model_for
from test_pixart import conditioning, noise as pixart_noise, pixart

S = de.schedulers
# A whole sampling run at tiny widths against the fp32 reference (measured: int8 50 dB in fp32, 43 dB in
# bf16; fp8 38 dB): a GEMM quantised wrongly (a scale per tensor instead of per row, a rounding off by one
# step) loses more than 10 dB.
SQNR_DB = {"int8": 35.0, "fp8": 28.0}


def run_dit(quantize, dtype=torch.float32, backend=None, **kwargs):
    model = model_for("DiT-S/2", depth=2)
    x, y = draw()
    sched = S.DDIM(10, timestep_spacing="trailing", clip_sample=False)
    ref = de.sample(model, sched, x, y, progress=False)
    sampler = FastSampler(model, sched, dtype=dtype, quantize=quantize, backend=backend, **kwargs)
    return sampler, sampler(x, y), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_dit_run_within_the_stated_sqnr(dtype):
    sampler, out, ref = run_dit("int8", dtype)
    blocks = sampler.fast.blocks
    assert all(isinstance(layer.packed, Int8Linear) for b in blocks for layer in b.values())
    assert not isinstance(sampler.fast.patch.packed, Int8Linear)  # the first and last layers stay exact
    quality = sqnr_db(out, ref)
    assert SQNR_DB["int8"] <= quality < 100, f"int8 run: {quality:.1f} dB"  # < 100: it did quantise


def test_int8_native_and_torch_forms_agree():
    _, native, _ = run_dit("int8")
    _, torch_body, _ = run_dit("int8", backend="reference")
    assert sqnr_db(native, torch_body) > 80  # the same quantisation; only the GELU's exp differs


def test_fp8_numerics_on_the_reference_backend():
    sampler, out, ref = run_dit("fp8", backend="reference")
    assert isinstance(sampler.fast.blocks[0]["fc1"].packed, Fp8Linear)
    quality = sqnr_db(out, ref)
    assert SQNR_DB["fp8"] <= quality < 100, f"fp8 run: {quality:.1f} dB"


def test_int8_pixart_run_within_the_stated_sqnr():
    model = pixart()
    cond = conditioning(model)
    sched = S.DPMSolverPP(4)
    ref = de.sample(model, sched, pixart_noise(), progress=False, **cond)
    out = FastSampler(model, sched, dtype=torch.float32, quantize="int8")(pixart_noise(), **cond)
    assert SQNR_DB["int8"] <= sqnr_db(out, ref) < 100


def test_the_api_takes_quantize_everywhere_and_refuses_what_cannot_run():
    model = model_for("DiT-S/2", depth=1)
    x, y = draw()
    sched = S.DDIM(3)
    fused = de.sample(model, sched, x, y, backend="fused", quantize="int8", progress=False)
    assert torch.equal(fused, FastSampler(model, sched, dtype=torch.float32, quantize="int8")(x, y))
    with pytest.raises(ValueError, match="quantize='int8' needs backend='fused'"):
        de.sample(model, sched, x, y, quantize="int8")
    with pytest.raises(ValueError, match="quantize='int4': expected one of"):
        FastSampler(model, sched, quantize="int4")
    with pytest.raises(ValueError, match="quantize='fp8' needs a CUDA GPU with fp8 tensor cores"):
        FastSampler(model, sched, quantize="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_gpu_quantized_run_within_the_stated_sqnr(quantize):
    if quantize == "fp8" and not de.kernels.fp8_supported(torch.device("cuda")):
        pytest.skip("needs fp8 tensor cores (sm_89+)")
    model, x, y = gpu_dit()
    sched = S.DDIM(10, timestep_spacing="trailing", clip_sample=False)
    ref = de.sample(model, sched, x, y, progress=False)
    out = FastSampler(model, sched, dtype=torch.bfloat16, quantize=quantize)(x, y)
    assert sqnr_db(out, ref) >= SQNR_DB[quantize] - 5  # bf16 around the quantised GEMMs costs a few dB more
