import os

import torch  # importing torch does not import Triton

# Triton's interpreter must be chosen before any kernel module imports Triton: without a GPU the kernels
# run through it (DESIGN.md section 6). On a GPU machine they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One pinned attention config under test: autotuning would time every config for every new shape.
os.environ.setdefault("DITENGINE_AUTOTUNE", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    import ditengine as de
    return de.DiTConfig.from_name("DiT-T/2", input_size=8, num_classes=10)


@pytest.fixture
def tiny_model(tiny_cfg):
    import ditengine as de
    torch.manual_seed(0)
    return de.DiT(tiny_cfg).eval()
