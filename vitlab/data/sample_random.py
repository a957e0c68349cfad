"""Random draws keyed by training sample, so that a run's result does not depend on how many processes share it.

A training sample gets a key from (seed, epoch, step, its position in the step's global batch): whichever process,
accumulation step or place in a micro-batch it lands in, the key is the same, and so is every draw made from it
(flip, crop, shift, RandAugment, patch dropout). Draws are a counter-based hash of (key, stream, counter): no
generator state to carry or split, vectorised over the batch, the same on every device.

The hash is Wellons' ``lowbias32`` (a bijection of 32-bit words with good avalanche), computed on int64 tensors with
products split into 16-bit halves so that nothing overflows.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

# one stream per kind of draw, so that two kinds never share a number
FLIP, SHIFT, CROP, MIRROR, RANDAUGMENT, PATCH_DROPOUT = 1, 2, 3, 4, 5, 6


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for words ``x`` in [0, 2**32) (each partial product stays below 2**48)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(base: int, positions: torch.Tensor) -> torch.Tensor:
    """Keys (int64 in [0, 2**63)) of the samples at ``positions`` (int64) of a step whose seed is ``base`` (a
    63-bit integer such as ``mix_seed(seed, epoch, step)``)."""
    p = positions.long()
    lo, hi = base & MASK32, (base >> 32) & MASK32
    a = _mix32(_mix32((p & MASK32) ^ lo) ^ hi ^ ((p >> 32) & MASK32))
    b = _mix32(a ^ lo ^ 0x9E3779B9)
    return (a << 31) | (b >> 1)


def keyed_words(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """``count`` uniform 32-bit words per key (int64, shape (B, count)) for one ``stream``."""
    lo = (keys & MASK32).unsqueeze(1)
    hi = ((keys >> 32) & MASK32).unsqueeze(1)
    s = _mix32(lo ^ (stream * 0x9E3779B9 & MASK32))
    counter = torch.arange(count, dtype=torch.int64, device=keys.device).unsqueeze(0)
    return _mix32(_mix32(counter ^ s) ^ hi)


def keyed_uniform(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """``count`` uniform float32 draws in [0, 1) per key, shape (B, count) (24 random bits each, exact in float32)."""
    return (keyed_words(keys, count, stream) >> 8).float() * (1.0 / (1 << 24))


def keyed_seeds(keys: torch.Tensor, stream: int) -> list[int]:
    """One 62-bit integer per key, to seed a per-sample ``torch`` generator (for transforms that draw from one)."""
    w = keyed_words(keys, 2, stream)
    return ((w[:, 0] << 30) | (w[:, 1] >> 2)).tolist()
