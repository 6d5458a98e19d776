from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@dataclass
class Head:
    weight: torch.Tensor  # (l, q)
    bias: torch.Tensor | None
    features: torch.Tensor  # (n, q)
    labels: torch.Tensor  # (n,) int64


def make_head(n: int = 300, q: int = 12, l: int = 5, seed: int = 0, bias: bool = True) -> Head:
    """A random head with features that carry class structure, and noisy integer labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(l, (n,), generator=generator)
    centres = torch.randn(l, q, generator=generator, dtype=torch.float64)
    features = centres[labels] + 0.7 * torch.randn(n, q, generator=generator, dtype=torch.float64)
    weight = torch.randn(l, q, generator=generator, dtype=torch.float64) * 0.5
    b = torch.randn(l, generator=generator, dtype=torch.float64) * 0.1 if bias else None
    return Head(weight, b, features, labels)


@pytest.fixture
def head() -> Head:
    return make_head()


def save_problem(folder: Path, head: Head, state_extra: dict | None = None) -> dict[str, Path]:
    """A .pt state dict (with a body layer) plus features.npy and its features.labels.npy in `folder`,
    named as `lip features` names them."""
    state = {
        "body.weight": torch.randn(head.weight.shape[1], 7, dtype=torch.float32),
        "body.bias": torch.randn(head.weight.shape[1], dtype=torch.float32),
        "fc.weight": head.weight.to(torch.float32),
    }
    if head.bias is not None:
        state["fc.bias"] = head.bias.to(torch.float32)
    state.update(state_extra or {})
    torch.save(state, folder / "model.pt")
    np.save(folder / "features.npy", head.features.numpy().astype(np.float32))
    np.save(folder / "features.labels.npy", head.labels.numpy())
    return {
        "model": folder / "model.pt",
        "features": folder / "features.npy",
        "labels": folder / "features.labels.npy",
    }


def catches(pid: int, number: int) -> bool:
    """Whether process `pid` has a handler for signal `number` (Linux: SigCgt in /proc): a test
    that signals lip waits for this, so that a loaded machine's slow interpreter start-up (before
    any of lip's code runs) is not what it tests."""
    import re

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(mask and int(mask.group(1), 16) >> (number - 1) & 1)
