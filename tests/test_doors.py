"""The public doors, one table: every bad input a user can hand a sampling call, for every registered family and
through both loops (`FastSampler` and `sample(..., backend="reference")`), is refused before any step runs, with
a clear error that names the argument. And a checkpoint that is recognisably a family's but incomplete is
reported as that family, naming the missing key."""
import pytest
import torch

import ditengine as de
from ditengine import families

from test_conformance import CASES, NAMES


def poisoned(value: float):
    def poison(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return poison


def first_float(named: dict) -> str | None:
    """The family's first floating conditioning tensor (its prompt embeddings); None for class labels."""
    return next((k for k, v in named.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


# (row, edit(noise, args, named) -> (noise, args, named), exception, regex naming the argument)
COMMON = [
    ("noise with a NaN", lambda n, a, k: (poisoned(float("nan"))(n), a, k), ValueError, r"^noise: .*NaN"),
    ("noise with an Inf", lambda n, a, k: (poisoned(float("inf"))(n), a, k), ValueError, r"^noise: .*Inf"),
    ("noise without its batch dim", lambda n, a, k: (n[0], a, k), ValueError, r"^noise: "),
    ("noise on the meta device", lambda n, a, k: (n.to("meta"), a, k), ValueError, r"^noise: "),
    ("integer noise", lambda n, a, k: (n.long(), a, k), (TypeError, ValueError), r"^noise: "),
    ("a stray positional argument", lambda n, a, k: (n, (*a, n), k), TypeError, r"^conditioning: .*positional"),
]
EMBEDDINGS = [  # on the family's first floating conditioning tensor
    ("embeddings with a NaN", poisoned(float("nan")), ValueError, "NaN or Inf"),
    ("embeddings with an Inf", poisoned(float("-inf")), ValueError, "NaN or Inf"),
    ("embeddings on the meta device", lambda t: t.to("meta"), ValueError, "meta tensor"),
]
GUIDANCE = [  # Flux dev's embedded guidance
    ("guidance NaN", float("nan"), ValueError, r"^guidance: expected a finite number"),
    ("guidance Inf tensor", torch.tensor([float("inf")]), ValueError, r"^guidance: .*NaN or Inf"),
    ("guidance as a string", "3.5", TypeError, r"^guidance: expected a number"),
    ("guidance of the wrong length", torch.ones(7), ValueError, r"^guidance: expected one value or one per row"),
]


def rows():
    for name in NAMES:
        for door in ("fused", "reference"):
            for row, edit, exc, match in COMMON:
                yield pytest.param(name, door, edit, exc, match, id=f"{name}-{door}-{row}")
            for row, bad, exc, match in EMBEDDINGS if name != "dit" else ():  # class labels: rows below
                def edit(n, a, k, bad=bad):
                    key = first_float(k)
                    assert key is not None, "the case has no floating conditioning to poison"
                    return n, a, {**k, key: bad(k[key])}
                yield pytest.param(name, door, edit, exc, match, id=f"{name}-{door}-{row}")
            if name == "dit":
                yield pytest.param(name, door, lambda n, a, k: (n, (a[0].to("meta"),), k), ValueError,
                                   r"^class_labels: ", id=f"{name}-{door}-class_labels on the meta device")
                yield pytest.param(name, door, lambda n, a, k: (n, (a[0].float(),), k), TypeError,
                                   r"^class_labels: expected an int64 or int32", id=f"{name}-{door}-float labels")
            if name == "flux":
                for row, bad, exc, match in GUIDANCE:
                    yield pytest.param(name, door, lambda n, a, k, bad=bad: (n, a, {**k, "guidance": bad}), exc,
                                       match, id=f"{name}-{door}-{row}")


@pytest.mark.parametrize("name, door, edit, exc, match", list(rows()))
def test_bad_input_is_refused_naming_the_argument(name, door, edit, exc, match):
    model, sched, noise, args, named, cfg = CASES[name]()
    noise, args, named = edit(noise, args, named)
    with pytest.raises(exc, match=match):
        if door == "fused":
            de.FastSampler(model, sched, cfg_scale=cfg, dtype=torch.float32, cuda_graph=None)(noise, *args, **named)
        else:
            de.sample(model, sched, noise, *args, cfg_scale=cfg, progress=False, **named)


def test_the_table_names_every_door_of_every_family():
    ids = [p.id for p in rows()]
    assert len(ids) == len(set(ids))
    for name in NAMES:
        for door in ("fused", "reference"):
            assert sum(i.startswith(f"{name}-{door}-") for i in ids) >= len(COMMON) + 2


@pytest.mark.parametrize("name", NAMES)
def test_an_incomplete_checkpoint_is_reported_as_its_family_with_the_missing_key(name):
    """Each tensor dropped in turn (every one: the keys a recogniser or the config inference reads included)."""
    model = CASES[name]()[0]
    spec = families.of_model(model).spec.__name__
    state = model.state_dict()
    options = {"pixart_config": model.config} if name == "pixart" else {}
    if name == "flux":
        options["axes_dims_rope"] = model.config.axes_dims_rope  # not in the shapes
    if name == "wan":
        options["attention_head_dim"] = model.config.head_dim  # not in the shapes
    assert isinstance(de.load_checkpoint(dict(state), **options), type(model))
    for key in state:
        with pytest.raises(ValueError) as err:
            de.load_checkpoint({k: v for k, v in state.items() if k != key}, **options)
        assert spec in str(err.value) and key in str(err.value), (key, str(err.value)[:300])
