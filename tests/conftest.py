"""Shared test fixtures."""

import os

import pytest
import torch

# The CPU kernel and the meaning of precision "auto" are chosen per machine by timing products
# (vitlab.compute.onednn, vitlab.compute.precision). Timed on a busy machine, two runs of one test could choose
# differently and differ in the last bits, so the suite pins both (here and in the subprocesses it starts); the
# tests of the choices themselves set or clear these variables with monkeypatch.
os.environ.setdefault("VITLAB_ONEDNN_LINEAR", "0")
os.environ.setdefault("VITLAB_AUTO_PRECISION", "fp32")


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


# vit_fmnist is the main job's model (global average pooling, sin-cos position embedding); tests of the class token
# or of a learned position embedding build it with these instead (width 128, 4 heads, MLP 256, the paper's class
# token and learned 1D position embedding: r_vit_fmnist's transformer)
CLASS_TOKEN_VIT = {"embed_dim": 128, "num_heads": 4, "mlp_dim": 256, "pool": "token", "class_token": True,
                   "pos_embed": "learned"}


def assert_checkpointing_keeps_gradients(model: torch.nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    """The gradients of a training-mode ``model`` on ``x`` are the same with ``set_grad_checkpointing(True)``."""
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=rtol)
