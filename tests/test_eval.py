import json
import numpy as np
import pytest
import torch

from ditengine.demo.data import digits
from ditengine.demo.eval import frechet_distance, pixel_frechet_distance


def noisy_digits(scale, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = digits().images[:n]
    return (real + scale * torch.randn(real.shape, generator=g)).clamp(-1, 1)


def test_pixel_frechet_distance_is_zero_on_the_data_and_grows_with_corruption():
    assert pixel_frechet_distance(digits().images) == pytest.approx(0.0, abs=1e-6)
    distances = [pixel_frechet_distance(noisy_digits(s)) for s in (0.05, 0.3, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_frechet_distance_matches_the_general_formula():
    """Against scipy's general matrix square root, on full-rank covariances where it is reliable."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    mu1, cov1, mu2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    general = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(general, rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_pixel_frechet_distance_rejects_bad_samples():
    with pytest.raises(ValueError, match=r"samples: expected at least 2 digit images \(N, 1, 8, 8\)"):
        pixel_frechet_distance(torch.rand(4, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        pixel_frechet_distance(torch.rand(1, 1, 8, 8))


def test_eval_cli_int8_and_guidance_interval_on_the_shipped_model(tmp_path, capsys):
    """The CLI's --quantize and --cfg-interval reach the sampler: int8 samples stay digits of their class, and the
    interval run is a different function of the same noise (rows report it)."""
    from ditengine.demo.eval import main

    out = tmp_path / "rows.json"
    assert main(["--schedulers", "ddim", "--backends", "fused", "--per-class", "3", "--steps", "10",
                 "--quantize", "int8", "--cfg-interval", "0,600", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["quantize"] == "int8" and row["cfg_interval"] == [0.0, 600.0] and row["seconds"] > 0
    assert row["accuracy"] >= 0.8, row
    with pytest.raises(SystemExit):
        main(["--cfg-interval", "0-600"])
    assert "expected LO,HI" in capsys.readouterr().err
