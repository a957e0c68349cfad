"""The CPU fast path for Linear layers: :func:`set_onednn_linear` swaps the ``nn.Linear`` layers of a built model
for :class:`OneDnnLinear`, whose large float32 CPU matrix products run on oneDNN.

PyTorch sends a float32 ``nn.Linear`` on the CPU to the BLAS (MKL) ``sgemm``. oneDNN, which PyTorch already uses for
convolutions, has its own JIT-generated AVX-512 GEMM kernels; on CPUs where MKL runs a narrower code path (AMD EPYC:
MKL takes its AVX2 path) oneDNN's inner product is more than twice as fast, on the same float32 math (results agree
to float32 rounding, about 1e-6 relative). Small products keep ``F.linear``: oneDNN's per-call overhead (tens of
microseconds) would dominate them.

The models themselves use plain ``nn.Linear``; the swap changes only the class of each layer in place, so the layer
keeps its ``weight`` / ``bias`` parameters (the same objects), state dict, hooks and ``isinstance``, and checkpoints,
optimisers and quantisers see nothing new. ``vitlab.create_model``, ``vitlab.load`` (and so every command) and the
training loop apply the machine's default to the models they build: ``VITLAB_ONEDNN_LINEAR=1`` / ``0`` when set,
otherwise a measurement (:func:`linear_choices`). Whether oneDNN beats MKL depends on the CPU, not its vendor (on
AMD EPYC Zen 4 / 5 MKL runs its AVX2 code and oneDNN's AVX-512 kernels are 1.5x faster; on an AVX2-only Zen 3 and on
Intel Xeons with AVX-512 MKL is as fast or faster), so the first time a Linear shape is built on a machine, oneDNN's
product and ``F.linear`` are timed at that shape, alternating, for a fraction of a second, and oneDNN is kept only
where it is clearly faster both in the forward product and in a training use (forward and the two backward
products). The answer is cached per CPU model, feature flags, PyTorch version and thread count in
``$VITLAB_HOME/kernels/onednn_linear.json``. ``set_onednn_linear(model, True)`` / ``False`` switches a model's
layers either way.

Eager training and inference use a small autograd function; under ``torch.compile`` the product is the opaque custom
op ``vitlab::onednn_linear`` so inductor still fuses everything around it. CUDA, other dtypes, autocast, tensor
subclasses, TorchScript and ONNX export all take the plain ``F.linear`` path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..errors import InvalidValueError
from ..home import vitlab_home

# Where oneDNN pays, measured by benchmarks/onednn_linear_thresholds.py (forward + backward of one layer against
# F.linear, docs/performance.md): below about 2^23 multiply-accumulates per product its fixed cost (tens of
# microseconds a call) eats the gain, and layers narrower than 128 features gain nothing.
ONEDNN_MIN_MACS = 1 << 23
ONEDNN_MIN_FEATURES = 128


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN's inner product (float32 CPU tensors; x (..., in), weight (out, in))."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_AVAILABLE: bool | None = None  # probed once, in eager mode (never inside a compiled region)


def onednn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN's dense inner product and it gives F.linear's result."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def _probe() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen, device="cpu") for s in ((3, 5, 16), (8, 16), (8,)))
        with torch.no_grad():
            return torch.allclose(onednn_product(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, bool, bool],
                     product=None):
    """Gradients of y = x W^T + b, each a oneDNN product: dx = dy W, dW = dy^T x, db = sum dy. ``product`` is the
    function that multiplies (the raw op in eager mode, the custom op in compiled graphs)."""
    product = product or onednn_product
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = product(grad, weight.t(), None)
    if needs[1] or needs[2]:
        grad2d = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        if needs[1]:
            grad_w = product(grad2d.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (out, in)
        if needs[2]:
            grad_b = grad2d.sum(0)
    return grad_x, grad_w, grad_b


class _OneDnnLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return _linear_backward(grad.contiguous(), x, weight, needs)


@torch.library.custom_op("vitlab::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b on oneDNN, as an op that ``torch.compile`` keeps whole. x: (..., in), W: (out, in)."""
    return onednn_product(x, weight, bias)


@onednn_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _op_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    # the backward products are the custom op too: inductor must not lower oneDNN's op itself (its lowering
    # expects frozen constant weights)
    return _linear_backward(grad.contiguous(), x, weight, needs, product=onednn_linear_op)


onednn_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


def _exporting() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` that runs large float32 CPU products on oneDNN (see the module docstring). Layers become one by
    :func:`set_onednn_linear`; the result is the same either way. ``onednn_training = False`` (set per layer where
    only oneDNN's forward product measured faster) keeps F.linear whenever autograd records the product."""

    onednn_training = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_onednn(x):
            if torch.compiler.is_compiling():
                return onednn_linear_op(x, self.weight, self.bias)
            return _OneDnnLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _takes_onednn(self, x: torch.Tensor) -> bool:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() < 2:
            return False
        if torch.is_autocast_enabled("cpu") or _exporting():
            return False
        if not self.onednn_training and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return False
        if not torch.compiler.is_compiling() and (type(x) is not torch.Tensor or type(w) is not nn.Parameter):
            return False  # tensor subclasses (DTensor, quantised or fake tensors) keep their own dispatch
        if min(w.shape) < ONEDNN_MIN_FEATURES:
            return False
        if x.numel() // max(x.shape[-1], 1) * w.shape[0] * w.shape[1] < ONEDNN_MIN_MACS:
            return False
        return bool(_AVAILABLE)


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it (``AuthenticAMD``, ``GenuineIntel``, ...); empty where unknown."""
    return _cpuinfo_field("vendor_id")


def _cpuinfo_field(name: str) -> str:
    """The first value of a ``/proc/cpuinfo`` field (``vendor_id``, ``model name``, ``flags``); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def onednn_linear_default() -> bool | None:
    """The ``VITLAB_ONEDNN_LINEAR`` setting: True (``1``) or False (``0``) when set and (for True) this PyTorch has
    oneDNN's inner product; None when unset, meaning each Linear shape is decided by measurement
    (:func:`linear_choices`)."""
    setting = os.environ.get("VITLAB_ONEDNN_LINEAR")
    if setting is None:
        return None
    if setting not in ("0", "1"):
        raise InvalidValueError(f"VITLAB_ONEDNN_LINEAR={setting!r}: use 1 (oneDNN fast path on) or 0 (off)")
    return setting == "1" and onednn_linear_available()


# --- choice by measurement -------------------------------------------------------------------------------------
# oneDNN is kept for a shape only when it takes at most this share of F.linear's time, in the forward product and in
# a whole training use: a margin against timing noise, so that the default is never slower than plain PyTorch
CALIBRATION_MARGIN = 0.9
CALIBRATION_BUDGET_S = 0.4  # time spent measuring the new shapes of one model (at least MIN rounds each)
CALIBRATION_ROUNDS = (5, 7)  # fewest and most alternating rounds per shape
# the size of each timed product: rows = this / (in x out), within CALIBRATION_ROWS; at least 128 rows because a
# ViT's Linear layers see hundreds of token rows, and GEMM kernels for a few rows rank differently
CALIBRATION_MACS = 1 << 24
CALIBRATION_ROWS = (128, 4096)
CALIBRATION_VERSION = 2
# a measurement in which F.linear ran below this rate was dominated by other load (threads waiting for a busy core:
# any x86 core with AVX2 does 30 GFLOP/s and more): it chooses F.linear for this process and is not cached
CALIBRATION_MIN_GFLOPS = 5.0
CHOICES = ("off", "inference", "on")  # F.linear; oneDNN when no gradient is recorded; oneDNN forward and backward
_CHOICES: dict[str, dict[str, dict]] = {}  # machine key -> shape -> measured entry, for this process


def calibration_path() -> Path:
    """The file that caches the measured choices: ``$VITLAB_HOME/kernels/onednn_linear.json``."""
    return vitlab_home() / "kernels" / "onednn_linear.json"


def machine_key() -> str:
    """What a measured choice holds for: the CPU model, a digest of its feature flags (VMs often hide the model's
    name), the PyTorch version and the number of threads."""
    flags = " ".join(sorted(_cpuinfo_field("flags").split()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return (f"{_cpuinfo_field('model name') or 'unknown CPU'} | flags {digest} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def linear_shapes(model: nn.Module, min_features: int | None = None) -> list[tuple[int, int]]:
    """The distinct (in_features, out_features) of ``model``'s Linear layers with both at least ``min_features``
    (default :data:`ONEDNN_MIN_FEATURES`: wide enough for oneDNN to matter), sorted."""
    least = ONEDNN_MIN_FEATURES if min_features is None else min_features
    return sorted({(m.in_features, m.out_features) for m in model.modules()
                   if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= least})


def calibration_rows(fan_in: int, fan_out: int) -> int:
    """Token rows of the timed products at a shape: about :data:`CALIBRATION_MACS` multiply-accumulates each."""
    low, high = CALIBRATION_ROWS
    return max(low, min(high, CALIBRATION_MACS // (fan_in * fan_out)))


def median_ratios(rounds: Iterable[dict[str, float]]) -> dict[str, float]:
    """oneDNN's time over F.linear's per round: ``forward`` (the forward product) and ``use`` (forward plus the two
    backward products) are the medians over the rounds, ``forward_high`` and ``use_high`` the ratio that all rounds
    but one in five stay under (the largest of up to four rounds). Each round holds seconds under
    ``onednn_forward``, ``onednn_backward``, ``linear_forward`` and ``linear_backward``."""
    rounds = list(rounds)
    forward = sorted(r["onednn_forward"] / r["linear_forward"] for r in rounds)
    use = sorted((r["onednn_forward"] + r["onednn_backward"]) / (r["linear_forward"] + r["linear_backward"])
                 for r in rounds)
    high = max(0, -(-4 * len(rounds) // 5) - 1)  # index of the 80th percentile
    return {"forward": statistics.median(forward), "use": statistics.median(use), "forward_high": forward[high],
            "use_high": use[high]}


def disturbed(rounds: list[dict[str, float]], fan_in: int, fan_out: int) -> bool:
    """Whether a shape's measurement says more about other load than about the kernels: F.linear's median forward
    product ran below :data:`CALIBRATION_MIN_GFLOPS`."""
    seconds = statistics.median(r["linear_forward"] for r in rounds)
    return 2 * calibration_rows(fan_in, fan_out) * fan_in * fan_out / max(seconds, 1e-12) < CALIBRATION_MIN_GFLOPS * 1e9


def decide(ratios: dict[str, float], margin: float = CALIBRATION_MARGIN) -> str:
    """The choice for a shape with these :func:`median_ratios` (one of :data:`CHOICES`): ``on`` where oneDNN is
    clearly faster (at most ``margin`` of F.linear's time in four rounds of five) in the forward product and in the
    training use, ``inference`` where only its forward product is, else ``off``. Scattered timings (a busy
    machine) therefore keep F.linear."""
    if ratios["forward_high"] > margin:
        return "off"
    return "on" if ratios["use_high"] <= margin else "inference"


def _timed_use(product, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Seconds of a forward product and of the two backward products (dx = dy W, dW = dy^T x)."""
    start = time.perf_counter()
    y = product(x, w, b)
    middle = time.perf_counter()
    product(y, w.t(), None)
    product(y.t(), x.t(), None)
    return middle - start, time.perf_counter() - middle


def measure_shape(fan_in: int, fan_out: int, budget_s: float = CALIBRATION_BUDGET_S) -> list[dict[str, float]]:
    """Time oneDNN's product and F.linear at one Linear shape, alternating which goes first, for
    ``CALIBRATION_ROUNDS`` rounds (more while within ``budget_s``); returns the rounds' timings (see
    :func:`median_ratios`)."""
    rows = calibration_rows(fan_in, fan_out)
    gen = torch.Generator().manual_seed(0)
    # on the CPU whatever the default device (torch.set_default_device("cuda") would put them on the GPU, where the
    # CPU generator cannot draw them and oneDNN's product does not run)
    x, w, b = (torch.randn(s, generator=gen, device="cpu") for s in ((rows, fan_in), (fan_out, fan_in), (fan_out,)))
    kernels = {"onednn": onednn_product, "linear": F.linear}
    rounds = []
    least, most = CALIBRATION_ROUNDS
    with torch.no_grad():
        for product in kernels.values():  # warm-up: oneDNN primitive creation, allocator
            _timed_use(product, x, w, b)
        start = time.perf_counter()
        while len(rounds) < most and (len(rounds) < least or time.perf_counter() - start < budget_s):
            timings = {}
            for name in (("onednn", "linear") if len(rounds) % 2 == 0 else ("linear", "onednn")):
                timings[f"{name}_forward"], timings[f"{name}_backward"] = _timed_use(kernels[name], x, w, b)
            rounds.append(timings)
    return rounds


def read_calibration(path: Path) -> dict:
    """The cached choices (machine key -> shape "INxOUT" -> entry); empty for a missing, unreadable or corrupt file
    (it is measured again and rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
        return {}
    machines = data.get("machines")
    if not isinstance(machines, dict):
        return {}
    return {key: {shape: entry for shape, entry in shapes.items()
                  if isinstance(entry, dict) and entry.get("choice") in CHOICES}
            for key, shapes in machines.items() if isinstance(shapes, dict)}


def write_calibration(path: Path, machines: dict) -> None:
    """Write the cached choices atomically (another process sees the old file or the new one, never half)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"version": CALIBRATION_VERSION, "machines": machines}, indent=1, sort_keys=True),
                       encoding="utf-8")


def linear_choices(shapes: Iterable[tuple[int, int]],
                   measure: Callable[[int, int, float], list[dict[str, float]]] | None = None
                   ) -> dict[tuple[int, int], str]:
    """Where each Linear shape (in_features, out_features) takes oneDNN on this machine (:data:`CHOICES`).
    ``VITLAB_ONEDNN_LINEAR`` decides every shape when set (``on`` / ``off``); otherwise a shape not yet in the cache
    (:func:`calibration_path`, keyed by :func:`machine_key`) is measured (``measure(in, out, budget_s)``,
    :func:`measure_shape`), decided (:func:`decide`) and stored. ``off`` everywhere when this PyTorch has no usable
    oneDNN inner product."""
    shapes = sorted(set(shapes))
    measure = measure or measure_shape
    setting = onednn_linear_default()
    if setting is not None or not shapes or not onednn_linear_available():
        return dict.fromkeys(shapes, "on" if setting else "off")
    key = machine_key()
    known = _CHOICES.get(key)
    if known is None or any(f"{i}x{o}" not in known for i, o in shapes):  # another process may have measured them
        known = _CHOICES[key] = {**(known or {}), **read_calibration(calibration_path()).get(key, {})}
    missing = [(i, o) for i, o in shapes if f"{i}x{o}" not in known]
    if missing:
        measured = {}
        busy = False
        for fan_in, fan_out in missing:
            if busy:  # the machine is too busy to measure: the remaining shapes keep F.linear, unmeasured
                known[f"{fan_in}x{fan_out}"] = {"choice": "off", "disturbed": True}
                continue
            rounds = measure(fan_in, fan_out, CALIBRATION_BUDGET_S / len(missing))
            ratios = median_ratios(rounds)
            entry = {"choice": decide(ratios), "rows": calibration_rows(fan_in, fan_out),
                     **{f"{name}_ratio": round(value, 4) for name, value in ratios.items()}}
            busy = disturbed(rounds, fan_in, fan_out)
            if busy:  # F.linear for now; measured again by the next process
                known[f"{fan_in}x{fan_out}"] = {**entry, "choice": "off", "disturbed": True}
            else:
                known[f"{fan_in}x{fan_out}"] = measured[f"{fan_in}x{fan_out}"] = entry
        if measured:
            path = calibration_path()
            machines = read_calibration(path)
            machines[key] = {**machines.get(key, {}), **measured}
            try:
                write_calibration(path, machines)
            except OSError:  # a read-only home: the choice still holds for this process
                pass
    return {(i, o): known[f"{i}x{o}"]["choice"] for i, o in shapes}


def set_onednn_linear(model: nn.Module, enabled: bool | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for :class:`OneDnnLinear` (``enabled``), or back, in place; returns
    ``model``. ``enabled=None`` applies this machine's default per layer shape (``VITLAB_ONEDNN_LINEAR`` when set,
    else the measured choice, :func:`linear_choices`). Only the layers' class changes: parameters, buffers, hooks
    and the state dict stay as they are. A no-op where this PyTorch build has no usable oneDNN inner product."""
    if enabled is None:
        enabled = onednn_linear_default()
    if enabled and not onednn_linear_available():  # probed here, so that a compiled forward only reads the answer
        return model
    # measured per shape unless decided for all (the layers narrower than ONEDNN_MIN_FEATURES are not measured)
    chosen = linear_choices(linear_shapes(model)) if enabled is None else None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            choice = ("on" if enabled else "off") if chosen is None else \
                chosen.get((module.in_features, module.out_features), "off")
            if choice != "off" and type(module) is nn.Linear:
                module.__class__ = OneDnnLinear
            elif choice == "off" and type(module) is OneDnnLinear:
                module.__class__ = nn.Linear
            if choice == "inference":  # oneDNN's forward wins, its backward products do not: F.linear in training
                module.onednn_training = False
            else:
                module.__dict__.pop("onednn_training", None)
    return model


def linear_kernels(model: nn.Module) -> dict:
    """Which product each Linear shape of ``model`` runs on in float32 on the CPU, and why, for a run's record:
    ``{"decided_by": ..., "shapes": {"INxOUT": "oneDNN" | "oneDNN (inference only)" | "F.linear"}}``. ``decided_by``
    is ``VITLAB_ONEDNN_LINEAR=0`` / ``=1``, ``measured on this CPU`` (with the cache file) or ``no oneDNN inner
    product in this PyTorch``. Layers narrower than :data:`ONEDNN_MIN_FEATURES` always take F.linear."""
    shapes: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            onednn = (isinstance(module, OneDnnLinear) and bool(_AVAILABLE)
                      and min(module.in_features, module.out_features) >= ONEDNN_MIN_FEATURES)
            kind = ("oneDNN" if module.onednn_training else "oneDNN (inference only)") if onednn else "F.linear"
            shapes[f"{module.in_features}x{module.out_features}"] = kind
    setting = os.environ.get("VITLAB_ONEDNN_LINEAR")
    if setting in ("0", "1"):
        how = f"VITLAB_ONEDNN_LINEAR={setting}"
    elif not onednn_linear_available():
        how = "no oneDNN inner product in this PyTorch"
    else:
        how = f"measured on this CPU ({machine_key()}; cached in {calibration_path()})"
    return {"decided_by": how, "shapes": dict(sorted(shapes.items()))}


def describe_linear_kernels(kernels: dict) -> str:
    """One line for a log: the shapes per kernel of a :func:`linear_kernels` record and what decided them."""
    by_kind: dict[str, list[str]] = {}
    for shape, kind in kernels["shapes"].items():
        by_kind.setdefault(kind, []).append(shape)
    parts = [f"{kind} for {', '.join(shapes)}" for kind, shapes in sorted(by_kind.items())]
    return f"Linear kernels (float32 CPU): {'; '.join(parts) or 'no Linear layers'} ({kernels['decided_by']})"
