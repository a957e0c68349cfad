"""Random draws keyed by training sample, so that a run's result does not depend on how many processes share it.

A training sample gets a key from (seed, epoch, step, its position in the step's global batch): whichever process,
accumulation step or place in a micro-batch it lands in, the key is the same, and so is every draw made from it
(flip, crop, shift, RandAugment, random erasing, patch dropout). Draws are a counter-based hash of (key, stream,
counter): no generator state to carry or split, vectorised over the batch, the same on every device.

The hash is a 32-bit ``lowbias32`` of Wellons' hash prospector (xor-shift 16, multiply by 0x21F0AAAD, xor-shift 15,
multiply by 0x735A2D97, xor-shift 15: a bijection of 32-bit words with low bias), computed on int64 tensors; both
multipliers are below 2**31, so no product of a 32-bit word overflows.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spaces successive counters apart before they are hashed

# one stream per kind of draw, so that two kinds never share a number
FLIP, SHIFT, CROP, MIRROR, RANDAUGMENT, PATCH_DROPOUT, ERASE, ERASE_NOISE = 1, 2, 3, 4, 5, 6, 7, 8


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The hash of 32-bit words ``x`` (int64 in [0, 2**32)); works in place on a fresh tensor."""
    x = x ^ (x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 15)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` of one Python integer."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & MASK32
    x ^= x >> 15
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def sample_keys(base: int, positions: torch.Tensor) -> torch.Tensor:
    """Keys (int64 in [0, 2**63)) of the samples at ``positions`` (int64) of a step whose seed is ``base`` (a
    63-bit integer such as ``mix_seed(seed, epoch, step)``)."""
    p = positions.long()
    lo, hi = base & MASK32, (base >> 32) & MASK32
    a = _mix32(_mix32((p & MASK32) ^ lo) ^ hi ^ ((p >> 32) & MASK32))
    b = _mix32(a ^ lo ^ GOLDEN)
    return (a << 31) | (b >> 1)


def keyed_words(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """``count`` uniform 32-bit words per key (int64, shape (B, count)) for one ``stream``: the hash of
    ``start + i * GOLDEN`` for counters ``i``, ``start`` a hash of (key, stream)."""
    start = _mix32(_mix32((keys & MASK32) ^ _mix32_int(stream)) ^ ((keys >> 32) & MASK32))
    counter = torch.arange(count, dtype=torch.int64, device=keys.device).mul_(GOLDEN)
    return _mix32((start.unsqueeze(1) + counter).bitwise_and_(MASK32))


def keyed_uniform(keys: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """``count`` uniform float32 draws in [0, 1) per key, shape (B, count) (24 random bits each, exact in float32)."""
    return (keyed_words(keys, count, stream) >> 8).float() * (1.0 / (1 << 24))


def keyed_seeds(keys: torch.Tensor, stream: int) -> list[int]:
    """One 62-bit integer per key, to seed a per-sample ``torch`` generator (for transforms that draw from one)."""
    w = keyed_words(keys, 2, stream)
    return ((w[:, 0] << 30) | (w[:, 1] >> 2)).tolist()
