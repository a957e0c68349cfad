"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values so that comparisons exercise every weight (zero heads, unit norms and
    zero class tokens would hide mapping mistakes)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
