"""LoRA adapters through `ditengine.accelerate`: every change to the pipeline's live peft state made after
`accelerate()` (load, `set_adapters` weights, the call's scale, fuse, unfuse, delete, unload) gives the pipeline's own
latents (fp32, relative error <= 1e-4) on both backends, the fused forms refit in place."""
import pytest
import torch

import ditengine as de

from support.diffusers_models import call_pipeline, rel_err, text_embeddings
from test_flux_pipeline import tiny_flux_pipeline
from test_sd3_pipeline import embeddings as sd3_embeddings
from test_sd3_pipeline import tiny_sd3_pipeline

pytest.importorskip("peft")

# Attention, MLP and modulation layers of both Flux block kinds, the image embedder and the output projection.
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
                "x_embedder", "context_embedder")
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj",
               "ff.net.0.proj", "ff.net.2", "norm1.linear")


def lora_weights(transformer, targets, rank=4, seed=0, std=0.3) -> dict:
    """A random LoRA in the peft format `pipe.load_lora_weights` reads: A (r, in) and B (out, r) of every Linear
    whose path ends with a target, non-zero (a fresh adapter's B is zero), scaled so each delta is ~std of W's."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in transformer.named_modules():
        m = getattr(m, "base_layer", m)  # a layer carrying an adapter already
        if isinstance(m, torch.nn.Linear) and name.endswith(targets):
            A = torch.randn(rank, m.in_features, generator=g) / m.in_features**.5
            state[f"transformer.{name}.lora_A.weight"] = A
            state[f"transformer.{name}.lora_B.weight"] = std * torch.randn(m.out_features, rank, generator=g) / rank**.5
    assert state, "no layer matched the targets"
    return state


def fused_tensors(fast, token_gemms: bool = False) -> list:
    """Every tensor the fused forms read (or the token GEMMs' alone), by object and (strided ones) address: equal
    before and after a refit means the storage was reused, so captured graphs stay valid."""
    held = {id(h): h for hs in fast.fast.holders.values() for h in hs}.values()
    out = []
    for h in held:
        if hasattr(h, "tensors"):
            tensors = h.tensors()
        elif token_gemms:
            continue
        else:
            tensors = [t for part in h.parts for t in part if t is not None]
        out += [(id(t), None if t.is_mkldnn else t.data_ptr()) for t in tensors]
    return out


FAMILIES = {
    "flux": (lambda: tiny_flux_pipeline(True), FLUX_TARGETS, lambda: text_embeddings(B=2), "joint_attention_kwargs"),
    "sd3": (tiny_sd3_pipeline, SD3_TARGETS, lambda: sd3_embeddings(B=2), "joint_attention_kwargs"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_every_adapter_change_after_accelerate_gives_the_pipelines_latents(family, backend):
    make, targets, embeds, attention_kwargs = FAMILIES[family]
    pipe = make()
    kwargs = dict(num_inference_steps=3, **embeds())
    base = call_pipeline(pipe, **kwargs)
    fast = de.accelerate(pipe, backend=backend)
    fused = backend == "fused"
    gemms = fused_tensors(fast, token_gemms=True) if fused else None
    before = None

    def check(**extra):
        want = call_pipeline(pipe, **kwargs, **extra)
        assert rel_err(call_pipeline(fast, **kwargs, **extra), want) <= 1e-4
        if fused:  # refit in place: the same tensors in the same storage
            assert fused_tensors(fast, token_gemms=True) == gemms
            assert before is None or fused_tensors(fast) == before
        return want

    pipe.load_lora_weights(lora_weights(pipe.transformer, targets, seed=1), adapter_name="one")
    one = check()
    assert rel_err(one, base) > 1e-2  # the adapter matters
    # The modulation weights the fast path shared with the model became copies at the first LoRA on them; from
    # here on every form keeps its storage.
    before = fused_tensors(fast) if fused else None
    pipe.load_lora_weights(lora_weights(pipe.transformer, targets, seed=2), adapter_name="two")
    pipe.set_adapters(["one", "two"], [1.0, -0.6])
    check()
    check(**{attention_kwargs: {"scale": 0.5}})
    pipe.fuse_lora()
    check()
    pipe.unfuse_lora()
    check()
    pipe.delete_adapters("two")
    assert rel_err(check(), one) <= 1e-4
    pipe.disable_lora()
    assert rel_err(check(), base) <= 1e-4
    pipe.enable_lora()
    check()
    pipe.unload_lora_weights()
    assert rel_err(check(), base) <= 1e-4


def test_a_lora_loaded_before_accelerate_and_an_unchanged_call_that_refits_nothing(monkeypatch):
    pipe = tiny_flux_pipeline(False)
    pipe.load_lora_weights(lora_weights(pipe.transformer, FLUX_TARGETS, seed=3))
    kwargs = dict(num_inference_steps=2, **text_embeddings())
    fast = de.accelerate(pipe)
    assert rel_err(call_pipeline(fast, **kwargs), call_pipeline(pipe, **kwargs)) <= 1e-4
    refits = []
    monkeypatch.setattr(fast.fast, "refit", lambda effective: refits.append(effective) or True)
    call_pipeline(fast, **kwargs)
    assert refits == []
    call_pipeline(fast, joint_attention_kwargs={"scale": 0.3}, **kwargs)
    assert len(refits) == 1 and len(refits[0]) == len(de.lora.peft_layers(pipe.transformer))


def test_int8_with_a_lora_is_as_close_to_its_pipeline_as_int8_without():
    from ditengine.bench.metrics import sqnr_db

    pipe = tiny_flux_pipeline(True, seed=4)
    kwargs = dict(num_inference_steps=3, **text_embeddings(B=2))
    fast = de.accelerate(pipe, quantize="int8")
    plain = sqnr_db(call_pipeline(fast, **kwargs), call_pipeline(pipe, **kwargs))
    pipe.load_lora_weights(lora_weights(pipe.transformer, FLUX_TARGETS, seed=5))
    with_lora = sqnr_db(call_pipeline(fast, **kwargs), call_pipeline(pipe, **kwargs))
    # Folded before quantisation, the LoRA costs int8 nothing: no more than 1 dB below int8 without it.
    assert with_lora >= 30 and with_lora >= plain - 1.0, (with_lora, plain)


def test_a_lora_on_a_layer_the_fused_path_does_not_hold_is_named():
    pipe = tiny_flux_pipeline(True)
    fast = de.accelerate(pipe)
    pipe.load_lora_weights(lora_weights(pipe.transformer, ("timestep_embedder.linear_1",)))
    with pytest.raises(ValueError, match="'time_text_embed.timestep_embedder.linear_1'.*no fused form"):
        call_pipeline(fast, num_inference_steps=2, **text_embeddings())
    with pytest.raises(ValueError, match="'time_text_embed.timestep_embedder.linear_1'"):
        de.accelerate(pipe)


def test_other_attention_kwargs_and_a_bad_scale_are_refused_by_name():
    pipe = tiny_flux_pipeline(True)
    fast = de.accelerate(pipe)
    with pytest.raises(ValueError, match=r"joint_attention_kwargs: only 'scale'.*\['ip_adapter_masks'\]"):
        call_pipeline(fast, joint_attention_kwargs={"ip_adapter_masks": None}, **text_embeddings())
    with pytest.raises(ValueError, match=r"joint_attention_kwargs\['scale'\]: expected a finite number"):
        call_pipeline(fast, joint_attention_kwargs={"scale": float("nan")}, **text_embeddings())


def test_from_diffusers_refuses_a_lora_transformer_and_points_to_accelerate():
    pipe = tiny_flux_pipeline(True)
    pipe.load_lora_weights(lora_weights(pipe.transformer, ("attn.to_q",)))
    with pytest.raises(ValueError, match="LoRA adapter.*accelerate"):
        de.from_diffusers(pipe.transformer)


def test_a_dora_adapter_is_refused_by_name():
    from peft import LoraConfig

    pipe = tiny_flux_pipeline(True)
    fast = de.accelerate(pipe)
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True), adapter_name="dora")
    with pytest.raises(ValueError, match="LoRA adapter 'dora': a variant"):
        call_pipeline(fast, num_inference_steps=2, **text_embeddings())


def test_the_refit_benchmark_runs_on_a_tiny_flux():
    pytest.importorskip("diffusers")
    from ditengine.bench.lora import run

    r = run(depth=1, image_size=32, rank=2, dtype=torch.float32, repeats=2, num_attention_heads=2,
            attention_head_dim=16, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    assert r["lora_layers"] == 22  # every attention and MLP layer of 1 double and 2 single blocks
    assert r["step_ms"] > 0 and r["refit_ms"] > 0 and r["one_pass_ms"] > 0 and r["unchanged_ms"] >= 0
