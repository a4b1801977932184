"""Shared test setup: CUDA tests are marked `cuda` and skipped without a GPU."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test (random data, never zeros)."""
    return torch.Generator().manual_seed(1234)
