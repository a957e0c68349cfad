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
training loop apply the machine's default to the models they build (:func:`onednn_linear_default`: on for AMD CPUs,
where it was measured faster, off elsewhere; ``VITLAB_ONEDNN_LINEAR=1`` / ``0`` decides instead);
``set_onednn_linear(model, True)`` / ``False`` switches a model's layers either way.

Eager training and inference use a small autograd function; under ``torch.compile`` the product is the opaque custom
op ``vitlab::onednn_linear`` so inductor still fuses everything around it. CUDA, other dtypes, autocast, tensor
subclasses, TorchScript and ONNX export all take the plain ``F.linear`` path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError

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
    :func:`set_onednn_linear`; the result is the same either way."""

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
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_linear_default() -> bool:
    """Whether models built by vitlab take the fast path on this machine. ``VITLAB_ONEDNN_LINEAR=1`` or ``0`` decides
    when set. Otherwise on for AMD CPUs, where MKL runs its AVX2 code and oneDNN's AVX-512 kernels were measured
    faster (vitlab / timm: ViT-S/16 training 1.34x, inference 1.5-1.6x), and off elsewhere: on an Intel Xeon with
    AVX-512 MKL was faster at every layer shape measured (oneDNN at 0.41-0.87x its speed) and the fast path made
    ViT-B/16 training 0.69-0.78x timm's (docs/performance.md)."""
    setting = os.environ.get("VITLAB_ONEDNN_LINEAR")
    if setting is not None:
        if setting not in ("0", "1"):
            raise InvalidValueError(f"VITLAB_ONEDNN_LINEAR={setting!r}: use 1 (oneDNN fast path on) or 0 (off)")
        wanted = setting == "1"
    else:
        wanted = cpu_vendor() == "AuthenticAMD"
    return wanted and onednn_linear_available()


def set_onednn_linear(model: nn.Module, enabled: bool | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for :class:`OneDnnLinear` (``enabled``), or back, in place; returns
    ``model``. ``enabled=None`` applies this machine's default (:func:`onednn_linear_default`). Only the layers'
    class changes: parameters, buffers, hooks and the state dict stay as they are. A no-op where this PyTorch build
    has no usable oneDNN inner product."""
    if enabled is None:
        enabled = onednn_linear_default()
    if enabled and not onednn_linear_available():  # probed here, so that a compiled forward only reads the answer
        return model
    for module in model.modules():
        if enabled and type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
        elif not enabled and type(module) is OneDnnLinear:
            module.__class__ = nn.Linear
    return model
