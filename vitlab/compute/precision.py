"""Reduced precision on the CPU, by measurement: whether bf16 (or fp16) autocast pays on this CPU for a model.

CPUs with native bf16 products (``avx512_bf16``, ``amx_bf16``: Intel Cooper Lake / Sapphire Rapids and later, AMD
Zen 4 and later) run bf16 matrix products faster than float32; on the others PyTorch emulates them by converting
to float32, and bf16 autocast is several times slower than plain float32 (9.4x in training on an AMD EPYC Zen 3).
So ``auto`` precision on the CPU (:func:`choose_cpu_precision`) picks bf16 only where the CPU has native bf16 *and*
bf16 autocast measures clearly faster at the model's own Linear shapes; asking for bf16 or fp16 on a CPU
that emulates it runs as asked but warns once with the measured slowdown. Measurements are cached per CPU model,
feature flags, PyTorch version and threads (:func:`vitlab.compute.onednn.machine_key`) in
``$VITLAB_HOME/kernels/precision.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from ..errors import InvalidValueError
from ..home import vitlab_home
from .onednn import _cpuinfo_field, machine_key

REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of native reduced-precision products
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
PRECISION_MARGIN = 0.9  # auto takes bf16 where it needs at most this share of float32's time
MIN_FEATURES = 128  # narrower layers are not measured (casts dominate them); a model with none keeps float32
ROWS = 512  # token rows per timed product: a few images' worth (autocast's weight casts amortise over rows)
ROUNDS = 5
CACHE_VERSION = 1
# when set (fp32 or bf16), what ``auto`` means on the CPU, without measuring
AUTO_PRECISION_ENV = "VITLAB_AUTO_PRECISION"


class EmulatedPrecisionWarning(UserWarning):
    """Reduced precision was asked for on a CPU that emulates it (slower than float32)."""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty where unknown)."""
    return frozenset(_cpuinfo_field("flags").split())


def has_native(precision: str, flags: Iterable[str] | None = None) -> bool:
    """Whether a CPU with ``flags`` (default: this one's) multiplies in ``precision`` (bf16 / fp16) natively."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return any(flag in flags for flag in NATIVE_FLAGS.get(precision, ()))


def measure_slowdown(shapes: Iterable[tuple[int, int]], precision: str = "bf16", rounds: int = ROUNDS) -> float:
    """Time of ``precision`` autocast over float32 for the forward products of Linear layers of these (in, out)
    shapes on ``ROWS`` rows: the median of alternating rounds (above 1: slower than float32)."""
    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randn(ROWS, i, generator=gen), torch.randn(o, i, generator=gen), torch.randn(o, generator=gen))
              for i, o in shapes]

    def run(reduced: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=REDUCED[precision], enabled=reduced):
            for x, w, b in layers:
                F.linear(x, w, b)
        return time.perf_counter() - start

    run(True), run(False)  # warm-up
    ratios = []
    for r in range(rounds):
        first = r % 2 == 0
        a = run(first)
        b = run(not first)
        ratios.append(a / b if first else b / a)
    return statistics.median(ratios)


def _cache_path() -> Path:
    return vitlab_home() / "kernels" / "precision.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("machines"), dict)
    return data["machines"] if ok else {}


_MEMO: dict[str, float] = {}


def cached_slowdown(shapes: list[tuple[int, int]], precision: str,
                    measure: Callable[[list[tuple[int, int]], str], float] | None = None) -> float:
    """:func:`measure_slowdown` for these shapes, measured once per machine (cached on disk, atomically written; a
    corrupt cache is ignored and rewritten)."""
    shapes = sorted(set(shapes))
    entry = f"{precision} " + " ".join(f"{i}x{o}" for i, o in shapes)
    key = machine_key()
    memo = f"{key} | {entry}"
    if memo in _MEMO:
        return _MEMO[memo]
    machines = _read_cache()
    value = machines.get(key, {}).get(entry) if isinstance(machines.get(key), dict) else None
    if not isinstance(value, (int, float)):
        value = float((measure or measure_slowdown)(shapes, precision))
        if not isinstance(machines.get(key), dict):
            machines[key] = {}
        machines[key][entry] = round(value, 4)
        try:
            with atomic_path(_cache_path()) as tmp:
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "machines": machines}, indent=1),
                               encoding="utf-8")
        except OSError:  # a read-only home: the answer still holds for this process
            pass
    _MEMO[memo] = float(value)
    return float(value)


_warned: set[str] = set()


def cpu_precision_reason(asked: str, shapes: Iterable[tuple[int, int]], flags: Iterable[str] | None = None) -> str:
    """Why :func:`choose_cpu_precision` gives what it gives for ``asked`` at these Linear ``shapes``, in words, for
    a run's record (reads the cached measurement; measures only where ``auto`` would have to anyway)."""
    if asked != "auto":
        return f"asked for {asked}"
    setting = os.environ.get(AUTO_PRECISION_ENV)
    if setting:
        return f"auto decided by {AUTO_PRECISION_ENV}={setting}"
    wide = [(i, o) for i, o in sorted(set(shapes)) if min(i, o) >= MIN_FEATURES]
    if not wide:
        return f"auto: no Linear layer {MIN_FEATURES} features wide, fp32 without measuring"
    if not has_native("bf16", flags):
        return "auto: this CPU has no native bf16 (" + " / ".join(NATIVE_FLAGS["bf16"]) + "), fp32"
    slowdown = cached_slowdown(wide, "bf16")
    return (f"auto: bf16 autocast measured {slowdown:.2f}x float32's time at this model's Linear shapes (bf16 at "
            f"{PRECISION_MARGIN} or less; cached in {_cache_path()})")


def choose_cpu_precision(precision: str, shapes: Iterable[tuple[int, int]], flags: Iterable[str] | None = None,
                         measure: Callable[[list[tuple[int, int]], str], float] | None = None) -> str:
    """The precision a model with Linear ``shapes`` (in, out) runs in on this CPU for ``precision`` (``auto``,
    ``fp32``, ``bf16`` or ``fp16``). ``auto``: ``$VITLAB_AUTO_PRECISION`` when set; else bf16 where the CPU has
    native bf16 (``flags``, default this CPU's) and bf16 autocast measured at most :data:`PRECISION_MARGIN` of
    float32's time at the model's shapes at least :data:`MIN_FEATURES` wide; float32 otherwise. A reduced precision
    asked for on a CPU without it natively is kept and warns once (:class:`EmulatedPrecisionWarning`) with the
    measured slowdown."""
    if precision not in ("auto", "fp32", *REDUCED):
        raise InvalidValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    shapes = sorted(set(shapes))
    wide = [(i, o) for i, o in shapes if min(i, o) >= MIN_FEATURES]
    if precision == "fp32":
        return "fp32"
    if precision == "auto":
        setting = os.environ.get(AUTO_PRECISION_ENV)
        if setting:  # the user (or a test run that needs the same arithmetic whatever the load) decides
            if setting not in ("fp32", "bf16"):
                raise InvalidValueError(f"{AUTO_PRECISION_ENV}={setting!r}: use fp32 or bf16")
            return setting
        if not wide or not has_native("bf16", flags):
            return "fp32"
        return "bf16" if cached_slowdown(wide, "bf16", measure) <= PRECISION_MARGIN else "fp32"
    if not has_native(precision, flags) and precision not in _warned:
        _warned.add(precision)
        slowdown = cached_slowdown(wide or shapes[-4:] or [(256, 256)], precision, measure)
        names = " / ".join(NATIVE_FLAGS[precision])
        warnings.warn(f"{precision} on this CPU is emulated (no {names}): its products measured {slowdown:.1f}x "
                      f"float32's time at this model's Linear shapes; use precision fp32 (or auto) here",
                      EmulatedPrecisionWarning, stacklevel=2)
    return precision
