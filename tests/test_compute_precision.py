"""Reduced precision on the CPU by measurement: ``auto`` takes bf16 only with native bf16 where it measures faster,
a reduced precision the CPU emulates warns once with the measured slowdown, and the measurement is cached."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import vitlab
from vitlab.compute import precision as P
from vitlab.compute.onednn import linear_shapes, machine_key
from vitlab.errors import InvalidValueError
from vitlab.train.run import resolve_precision

ZEN3 = frozenset({"avx2", "fma"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"})
WIDE = [(384, 384), (384, 1152), (384, 1536), (1536, 384)]


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A temporary $VITLAB_HOME, an empty memo, and an injected slowdown that counts its calls."""
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path))
    monkeypatch.delenv(P.AUTO_PRECISION_ENV, raising=False)
    monkeypatch.setattr(P, "_MEMO", {})
    monkeypatch.setattr(P, "_warned", set())
    state = {"slowdown": 0.5, "calls": []}

    def measure(shapes, precision):
        state["calls"].append((tuple(shapes), precision))
        return state["slowdown"]

    monkeypatch.setattr(P, "measure_slowdown", measure)
    return state


def test_auto_takes_bf16_only_with_native_bf16_where_it_measures_faster(measured):
    assert P.choose_cpu_precision("auto", WIDE, flags=ZEN3) == "fp32"  # emulated: not even measured
    assert measured["calls"] == []
    assert P.choose_cpu_precision("auto", WIDE, flags=SAPPHIRE_RAPIDS) == "bf16"
    assert P.choose_cpu_precision("auto", [(32, 64), (64, 32)], flags=SAPPHIRE_RAPIDS) == "fp32"  # too narrow
    assert len(measured["calls"]) == 1
    P._MEMO.clear()
    P._cache_path().unlink()
    measured["slowdown"] = 0.95  # native, but not clearly faster at these shapes (casts, small products)
    assert P.choose_cpu_precision("auto", WIDE, flags=SAPPHIRE_RAPIDS) == "fp32"
    assert P.choose_cpu_precision("fp32", WIDE, flags=SAPPHIRE_RAPIDS) == "fp32"
    with pytest.raises(InvalidValueError, match="precision must be auto, fp32, bf16 or fp16, got 'fp8'"):
        P.choose_cpu_precision("fp8", WIDE)


def test_forcing_an_emulated_precision_warns_once_with_the_measured_slowdown(measured):
    measured["slowdown"] = 9.4
    with pytest.warns(P.EmulatedPrecisionWarning, match=r"bf16 on this CPU is emulated \(no avx512_bf16 / amx_bf16\): "
                                                        r"its products measured 9.4x float32's time"):
        assert P.choose_cpu_precision("bf16", WIDE, flags=ZEN3) == "bf16"  # runs as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.choose_cpu_precision("bf16", WIDE, flags=ZEN3) == "bf16"  # once per process
        assert P.choose_cpu_precision("bf16", WIDE, flags=SAPPHIRE_RAPIDS) == "bf16"  # native: silent
    with pytest.warns(P.EmulatedPrecisionWarning, match="fp16 on this CPU is emulated"):
        P.choose_cpu_precision("fp16", [(32, 64)], flags=ZEN3)  # narrow models are measured at their own shapes


def test_the_measurement_is_cached_on_disk_and_a_corrupt_cache_is_rewritten(measured):
    assert P.cached_slowdown(WIDE, "bf16") == 0.5
    P._MEMO.clear()  # a new process reads the file
    assert P.cached_slowdown(WIDE, "bf16") == 0.5 and len(measured["calls"]) == 1
    entry = json.loads(P._cache_path().read_text())["machines"][machine_key()]
    assert entry == {"bf16 384x384 384x1152 384x1536 1536x384": 0.5}
    P._cache_path().write_text("{broken")
    P._MEMO.clear()
    assert P.cached_slowdown(WIDE, "bf16") == 0.5 and len(measured["calls"]) == 2
    assert json.loads(P._cache_path().read_text())["version"] == P.CACHE_VERSION


def test_training_resolves_auto_at_the_models_shapes_on_the_cpu(measured, monkeypatch):
    monkeypatch.setattr(P, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    model = vitlab.models.create_model("vit_s16", depth=1)
    assert resolve_precision("auto", torch.device("cpu"), model) == "bf16"
    assert measured["calls"][0] == (tuple(linear_shapes(model, min_features=0)), "bf16")
    tiny = vitlab.models.create_model("vit_ti16", img_size=32, depth=1, embed_dim=64, num_heads=2, num_classes=5)
    assert resolve_precision("auto", torch.device("cpu"), tiny) == "fp32"  # nothing wide enough to gain
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # no model: as before


def test_bf16_autocast_on_the_cpu_is_slower_than_fp32_where_emulated():
    """The real measurement runs and returns a positive time ratio (its value depends on the CPU)."""
    assert P.measure_slowdown([(128, 128)], "bf16", rounds=1) > 0


def test_the_environment_decides_auto_without_measuring(measured, monkeypatch):
    monkeypatch.setenv(P.AUTO_PRECISION_ENV, "bf16")
    assert P.choose_cpu_precision("auto", WIDE, flags=ZEN3) == "bf16"
    monkeypatch.setenv(P.AUTO_PRECISION_ENV, "fp32")
    assert P.choose_cpu_precision("auto", WIDE, flags=SAPPHIRE_RAPIDS) == "fp32"
    assert measured["calls"] == []
    monkeypatch.setenv(P.AUTO_PRECISION_ENV, "half")
    with pytest.raises(InvalidValueError, match="VITLAB_AUTO_PRECISION='half': use fp32 or bf16"):
        P.choose_cpu_precision("auto", WIDE)
