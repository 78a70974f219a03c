"""What every family's checkpoint loader shares: reading a checkpoint as diffusers does, and building the model
with no second copy of its weights.

- Files are read one tensor at a time (`safetensors.safe_open`, memory-mapped; `torch.load(mmap=True)` for
  `.bin` / `.pt`), each converted to the asked dtype (default: its own) and placed on the asked device as it is
  read, its finiteness checked then. A diffusers folder may be sharded (`*.safetensors.index.json` or
  `*.bin.index.json` plus its shards) or hold one file.
- The model is built on the meta device (`empty`) and filled by `load_state_dict(assign=True)` (`load_strict`):
  no random initialisation, and its parameters are the tensors read (or a live transformer's own, which is how
  `from_diffusers` shares storage with the module it converts).
"""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch

# A diffusers model folder's weights: the index of a sharded checkpoint first, as diffusers looks for them.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin")
_LORA_KEY = re.compile(r"\.(base_layer|lora_[AB]|lora_(up|down)|lora_magnitude_vector)(\.|$)")
_WRAPPERS = ("ema", "model", "state_dict")  # training checkpoints keep the weights one level down


def check_placement(dtype, device) -> torch.device | None:
    """`dtype` (a floating torch.dtype or None) and `device` (anything torch.device takes, or None) checked;
    the device parsed."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16) or "
                        f"None for the checkpoint's own, got {dtype!r}")
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...): {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda", "meta") and not hasattr(torch, device.type):
        raise ValueError(f"device: {device} is not available here")
    return device


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value of t is finite, checked a slice at a time: a whole-tensor isfinite would hold a mask
    half a bf16 weight's size (a Flux MLP weight: 38 MB) at the peak of loading."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


class Placer:
    """Converts each tensor as it is read: to `dtype` (floating tensors only; None keeps theirs), onto `device`
    (None keeps theirs), and notes the names of those holding NaN or Inf (`check`)."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device | None, check: bool):
        self.dtype, self.device, self.check = dtype, device, check
        self.nonfinite: list[str] = []

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"checkpoint: expected a state dict of tensors, but {name!r} is a {type(t).__name__}")
        # One conversion, where the tensor goes: a bf16 file loaded as fp32 onto a GPU is widened there, not first
        # on the host. A tensor already in place is returned as it is (no copy).
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        t = t.detach().to(device=self.device or t.device, dtype=dtype)
        if self.check and t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            self.nonfinite.append(name)
        return t

    def done(self) -> None:
        if self.nonfinite:
            raise ValueError(f"checkpoint: {len(self.nonfinite)} tensors hold NaN or Inf values: "
                             f"{', '.join(sorted(self.nonfinite))} (pass allow_nonfinite=True to load it anyway)")


def _read_safetensors(path: Path, place: Placer, keys=None) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else keys
            check_not_lora(names)
            absent = sorted(set(names) - set(f.keys()))
            if absent:
                raise ValueError(f"{path}: the index places {len(absent)} tensors in this shard that it does not "
                                 f"hold: {', '.join(absent)}")
            return {k: place(k, f.get_tensor(k)) for k in names}
    except (SafetensorError, OSError, RuntimeError) as err:  # a truncated or foreign file
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: {err} (truncated or not a "
                         "safetensors file?)") from err


def _torch_load(path: Path):
    try:
        try:  # zip-format files (torch.save since 1.6) map lazily; older ones are read whole
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files surface as many exception types
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err


def _read_index(path: Path, place: Placer) -> dict:
    """A sharded checkpoint: its index's weight map, every shard present, each read once."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a checkpoint index (a JSON object with a 'weight_map'): {err}") from err
    check_not_lora(weight_map)
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    absent = sorted(s for s in shards if not (path.parent / s).is_file())
    if absent:
        raise FileNotFoundError(f"{path}: {len(absent)} of its {len(shards)} shards are missing from "
                                f"{path.parent}: {', '.join(absent)}")
    state = {}
    for shard, keys in shards.items():
        file = path.parent / shard
        if file.suffix == ".safetensors":
            state.update(_read_safetensors(file, place, keys))
        else:
            part = _torch_load(file)
            state.update({k: place(k, part[k]) for k in keys if k in part})
            absent = sorted(set(keys) - set(part))
            if absent:
                raise ValueError(f"{file}: the index places tensors in this shard that it does not hold: "
                                 f"{', '.join(absent)}")
            del part
    return state


def _read_config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"could not read {path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got {type(config).__name__}")
    return config


def weights_file(folder: Path, variant: str | None = None) -> Path:
    """The weights of a diffusers model folder (the index of a sharded one first), `variant` ("fp16", ...) as
    diffusers names it."""
    names = [n.replace("diffusion_pytorch_model", f"diffusion_pytorch_model.{variant}") if variant else n
             for n in WEIGHT_FILES]
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{folder}: none of {', '.join(names)} in this directory")
    return found


def _unwrap(state: dict) -> tuple[dict, dict]:
    """(the state dict, ditengine.train's config dict or {}) of a file's payload."""
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: expected a state dict of tensors, got a {type(state).__name__}")
    own_config = state.get("config") if isinstance(state.get("config"), dict) else {}
    for wrapper in _WRAPPERS:
        if wrapper in state and isinstance(state[wrapper], dict):
            return state[wrapper], own_config
    return state, own_config


def read_state(source, dtype: torch.dtype | None = None, device=None, allow_nonfinite: bool = False,
               variant: str | None = None) -> tuple[dict, dict, dict]:
    """(state dict, diffusers config or {}, ditengine.train's config or {}) of `source`: a diffusers model or
    pipeline folder (sharded or not), a `.safetensors` file, an index file, a `.bin` / `.pt` / `.pth` file, or a
    dict. A LoRA's keys are refused before any tensor is read; then each tensor is read, converted to `dtype`,
    placed on `device` and checked in turn."""
    device = check_placement(dtype, device)
    place = Placer(dtype, device, not allow_nonfinite)
    config = own_config = {}
    if isinstance(source, dict):
        raw, own_config = _unwrap(source)
        check_not_lora(raw)
        state = {k: place(k, v) for k, v in raw.items()}
    else:
        path = Path(source)
        if path.is_dir():
            if (path / "transformer").is_dir() and not (path / "config.json").exists():  # a whole pipeline
                path = path / "transformer"
            config = _read_config(path / "config.json")
            path = weights_file(path, variant)
        elif not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.name.endswith(".index.json"):
            config = config or _read_config(path.parent / "config.json")  # a diffusers folder's index
            state = _read_index(path, place)
        elif path.suffix == ".safetensors":
            state = _read_safetensors(path, place)
        else:
            raw, own_config = _unwrap(_torch_load(path))
            check_not_lora(raw)
            state = {k: place(k, v) for k, v in raw.items()}
            del raw
    place.done()
    return state, config, own_config


def check_not_lora(state) -> None:
    """A state dict holding a peft LoRA's keys (`base_layer`, `lora_A` / `lora_B`) is refused, saying what to do."""
    lora = [k for k in state if _LORA_KEY.search(k)]
    if lora:
        raise ValueError(f"checkpoint: {len(lora)} keys belong to a LoRA adapter (e.g. {lora[0]!r}): load the base "
                         "model's weights, or merge the LoRA into them first (diffusers: pipe.fuse_lora(), then "
                         "pipe.unload_lora_weights(), before converting the transformer); ditengine.accelerate(pipe) "
                         "serves a pipeline's live LoRA adapters itself")


def empty(cls, config):
    """`cls(config)` with its parameters on the meta device: no memory, no random initialisation; `load_strict`
    fills it. Fixed tables a spec computes itself (position embeddings) are built on the CPU by the spec."""
    with torch.device("meta"):
        return cls(config)


def load_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> torch.nn.Module:
    """Fill `model` (built by `empty`, or a live one) with a state dict in its own key names, strictly, taking the
    tensors as they are (`assign=True`: their dtype and device, no copy). One ValueError lists every missing,
    unexpected and mis-shaped key (a wrong config or another model's checkpoint shows all its differences at once).
    Buffers the spec computed itself follow the parameters' device and floating dtype."""
    own = model.state_dict()
    problems = [(title, sorted(keys)) for title, keys in (
        ("missing keys", set(own) - set(state)), ("unexpected keys", set(state) - set(own)),
        ("mis-shaped", {f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape}))
        if keys]
    if problems:
        raise ValueError("\n".join([f"{source} does not match {type(model).__name__}({model.config})"]
                                   + [f"  {t} ({len(k)}): {', '.join(k)}" for t, k in problems]))
    model.load_state_dict(state, assign=True)
    params = list(model.parameters())
    if params:
        device, dtype = params[0].device, params[0].dtype
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and name in module._non_persistent_buffers_set:
                    module._buffers[name] = buf.to(device, dtype if buf.is_floating_point() else buf.dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: {', '.join(left)} left on the meta device after loading")
    return model


def resolve_config(cls, config, infer, state: dict):
    """`config` when it is already a `cls`; else `infer(state, **fields)` with the fields of a diffusers config
    dict (a config.json) that `cls` has winning over what the shapes give (None: all inferred)."""
    if isinstance(config, cls):
        return config
    names = {f.name for f in fields(cls)}
    return infer(state, **{k: v for k, v in (config or {}).items() if k in names})


def diffusers_state(transformer, expected: str, peft_base: bool = False) -> dict:
    """A live diffusers transformer's state dict after checking its class name: its own tensors (their dtype,
    their device, their storage), so the model built from them shares it. A transformer on the meta device (its
    weights released) is refused, and one carrying a peft LoRA too unless `peft_base` asks for its base weights
    (the caller folds the adapters: `ditengine.lora`)."""
    if type(transformer).__name__ != expected:
        raise TypeError(f"from_diffusers: expected a diffusers {expected}, got {type(transformer).__name__}")
    if peft_base:
        from ..lora import base_state_dict

        state = base_state_dict(transformer)
    else:
        state = transformer.state_dict()
    check_not_lora(state)
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise ValueError(f"from_diffusers: the transformer's weights are on the meta device ({meta[0]}, ...): load "
                         "them first (or were they released by ditengine.accelerate(..., release_transformer=True)?)")
    return state
