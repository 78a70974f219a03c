"""Quality metrics shared by the benchmark and the tests."""
from __future__ import annotations

import math

import torch


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.double() - ref.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / noise)
