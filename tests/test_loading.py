"""Loading as diffusers does, for every family: sharded and single-file folders equal to diffusers' own
`from_pretrained`, the checkpoint's dtype kept (or the one asked for), the model built on meta and filled without
random initialisation, `from_diffusers` sharing the live transformer's storage, and each bad input named."""
import json

import pytest
import torch

import ditengine as de
from ditengine.models.loading import all_finite, read_state

diffusers = pytest.importorskip("diffusers")

# The q|k|v (and PixArt's cross k|v) rows the DiT and PixArt specs hold as one fused weight: `from_diffusers`
# concatenates them, every other tensor is the transformer's own.
FUSED = {"dit": ("attn.qkv.",), "pixart": ("attn.qkv.", "cross_attn.kv_linear.")}


def family(name: str):  # noqa: C901 (one branch per family)
    """(a random fp32 diffusers transformer, run(model) -> its output on fixed inputs, for theirs and ours)."""
    if name == "dit":
        from support.diffusers_models import inputs, tied_diffusers_dit

        x, t, y = inputs()

        def run(m):
            out = m(x.to(dtype_of(m)), t, y)
            return out.sample if hasattr(out, "sample") else out
        return tied_diffusers_dit(sample_size=8), run
    from support.diffusers_models import randomize
    if name == "pixart":
        import test_pixart_model as tm

        config = tm.TINY
        model = diffusers.PixArtTransformer2DModel(**config).eval()
        randomize(model, 0)
        x, kw = tm.inputs(de.PixArtConfig.from_diffusers(config), (8, 8), tm.MASKS["partial"])
        def run(m):
            cast = {k: v.to(dtype_of(m)) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in kw.items()}
            return m(x.to(dtype_of(m)), return_dict=False, **cast)[0]
        return model, run
    if name == "sd3":
        import test_sd3_model as tm

        config = tm.CONFIGS["sd35-diffusers-test"]
        x = tm.inputs(config, (8, 8), 5)
        model = randomize(diffusers.SD3Transformer2DModel(**config), 0).eval()
    elif name == "flux":
        import test_flux_model as tm

        config = tm.CONFIGS["dh64-dev"]
        x = tm.inputs(config)
        model = randomize(diffusers.FluxTransformer2DModel(**config), 0).eval()
    else:
        import test_ace_step_model as tm

        config = tm.CONFIGS["gqa2-dh16"]
        x = tm.inputs(config)
        x["timestep_r"] = x["timestep"]
        model = randomize(diffusers.AceStepTransformer1DModel(**config), 0).eval()
    return model, lambda m: m(**{k: v.to(dtype_of(m)) if k not in ("img_ids", "txt_ids") else v for k, v in x.items()},
                              return_dict=False)[0]


def dtype_of(model):
    return next(model.parameters()).dtype


FAMILIES = ["dit", "pixart", "sd3", "flux", "ace_step"]


def rel_err(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_and_single_file_folders_equal_from_pretrained(name, tmp_path):
    theirs, run = family(name)
    theirs.save_pretrained(tmp_path / "sharded" / "transformer", max_shard_size="20KB")
    theirs.save_pretrained(tmp_path / "single")
    index = json.loads((tmp_path / "sharded" / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
                       .read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = type(theirs).from_pretrained(tmp_path / "single").eval()
    with torch.no_grad():
        want = run(reloaded)
        for source in (tmp_path / "sharded", tmp_path / "single"):  # a pipeline folder, a model folder
            model = de.load_checkpoint(source)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            assert rel_err(run(model), want) <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_dtype_is_kept_or_converted_and_nothing_is_left_on_meta(name, tmp_path, monkeypatch):
    theirs, run = family(name)
    theirs.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="50KB")
    touched = []
    real_normal, real_uniform = torch.nn.init.normal_, torch.nn.init.uniform_

    def record(real):
        def init(*args, **kwargs):
            touched.append((args[0] if args else kwargs["tensor"]).device.type)
            return real(*args, **kwargs)
        return init

    # A model built on meta may run its initialisers on meta tensors (free); never on real ones.
    monkeypatch.setattr(torch.nn.init, "normal_", record(real_normal))
    monkeypatch.setattr(torch.nn.init, "uniform_", record(real_uniform))
    model = de.load_checkpoint(tmp_path)  # the checkpoint's own dtype
    assert set(touched) <= {"meta"}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not [n for n, t in tensors.items() if t.is_meta]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    monkeypatch.undo()
    as_fp32 = de.load_checkpoint(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    with torch.no_grad():  # the bf16 model runs, within twice diffusers' own bf16 error of the same weights in fp32
        low, high, theirs_low = run(model), run(as_fp32), run(theirs)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert rel_err(low, high) <= 2 * rel_err(theirs_low, high) + 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_from_diffusers_shares_the_transformers_storage(name):
    theirs, run = family(name)
    theirs.to(torch.bfloat16)
    pointers = {t.untyped_storage().data_ptr() for t in theirs.state_dict().values()}
    model = de.from_diffusers(theirs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    own = {n: p.untyped_storage().data_ptr() in pointers for n, p in model.named_parameters()}
    fused = FUSED.get(name, ())
    assert all(shared for n, shared in own.items() if not any(f in n for f in fused)), \
        [n for n, shared in own.items() if not shared]
    assert not any(shared for n, shared in own.items() if any(f in n for f in fused))
    with torch.no_grad():
        assert rel_err(run(model), run(theirs)) <= 1e-2  # bf16 both, one formula


@pytest.mark.parametrize("name", FAMILIES)
def test_each_diffusers_state_dict_is_recognised_as_its_own_family_alone(name):
    """Every recogniser is asked, not only the first to answer: the catch-all DiT's diffusers keys (a patch
    embedding beside `transformer_blocks.`) once passed for SD3's."""
    from ditengine import families

    state = family(name)[0].state_dict()
    takers = [f.name for f in families.families() if f.recognises is not None and not f.catch_all
              and f.recognises(state)]
    assert takers == ([] if name == "dit" else [name])
    assert families.of_state(state).name == name


def test_index_file_and_bin_shards_load(tmp_path):
    theirs, run = family("flux")
    theirs.save_pretrained(tmp_path / "st", max_shard_size="30KB")
    theirs.save_pretrained(tmp_path / "bin", max_shard_size="30KB", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin.index.json").exists()
    with torch.no_grad():
        want = run(theirs)
        for source in (tmp_path / "st" / "diffusion_pytorch_model.safetensors.index.json", tmp_path / "bin"):
            assert rel_err(run(de.load_checkpoint(source)), want) <= 1e-5


def test_all_finite_checks_every_slice():
    t = torch.randn(1000)
    assert all_finite(t, chunk=64)
    for i in (0, 63, 64, 999):
        bad = t.clone()
        bad[i] = float("nan") if i % 2 else float("inf")
        assert not all_finite(bad, chunk=64)


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    theirs, _ = family("flux")
    theirs.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return tmp_path, index


def test_a_missing_shard_is_named(sharded):
    folder, index = sharded
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"shards are missing .*{shard}"):
        de.load_checkpoint(folder)


def test_an_index_naming_a_tensor_its_shard_lacks_is_named(sharded):
    folder, index = sharded
    index["weight_map"]["proj_out.extra"] = index["weight_map"]["proj_out.weight"]
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not hold: proj_out.extra"):
        de.load_checkpoint(folder)


def test_a_truncated_shard_is_named(sharded):
    folder, index = sharded
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"could not read checkpoint .*{shard.name}"):
        de.load_checkpoint(folder)


def test_a_folder_without_weights_lists_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors.index.json"):
        de.load_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, "bf16"])
def test_a_non_floating_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        read_state({"w": torch.ones(2)}, dtype=dtype)


@pytest.mark.parametrize("device, match", [("gpu", "not a torch device"), ("cuda:0", "no CUDA device")])
def test_an_unknown_or_absent_device_is_refused(device, match):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match=f"device: .*{match}"):
        read_state({"w": torch.ones(2)}, device=device)


def test_a_lora_state_dict_says_what_to_do():
    theirs, _ = family("flux")
    state = dict(theirs.state_dict())
    weight = state.pop("transformer_blocks.0.attn.to_q.weight")
    state["transformer_blocks.0.attn.to_q.base_layer.weight"] = weight
    state["transformer_blocks.0.attn.to_q.lora_A.default.weight"] = torch.randn(4, weight.shape[1])
    state["transformer_blocks.0.attn.to_q.lora_B.default.weight"] = torch.randn(weight.shape[0], 4)
    with pytest.raises(ValueError, match="belong to a LoRA adapter .*fuse_lora"):
        de.load_checkpoint(state)


def test_non_finite_tensors_are_named_as_they_are_read(sharded):
    folder, _ = sharded
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["proj_out.weight"]
    part = load_file(shard)
    part["proj_out.weight"][0, 0] = float("nan")
    save_file(part, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 tensors hold NaN or Inf values: proj_out.weight"):
        de.load_checkpoint(folder)
    assert torch.isnan(de.load_checkpoint(folder, allow_nonfinite=True).proj_out.weight).any()
