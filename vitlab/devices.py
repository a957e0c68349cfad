"""The one rule for turning a ``--device`` value into a ``torch.device``, shared by training, evaluation and
benchmarks so that every command picks the same device, also under ``torchrun``; and the one mixed-precision
context they run their forwards in."""

from __future__ import annotations

import os

import torch

from .errors import InvalidValueError


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU; otherwise ``torch.device(name)``, checked.

    A CUDA device without an index is this process's own: ``local_rank``, by default torchrun's ``LOCAL_RANK``
    (0 for a single process)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"device {name!r} requested but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward's mixed-precision context: bf16 or fp16 autocast on ``device`` for ``precision='bf16'`` /
    ``'fp16'``, a disabled one (plain float32) otherwise."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
