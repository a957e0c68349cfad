"""Count any model's forward multiply-accumulates by running it on the meta device (shapes only, no arithmetic).

Each module type contributes its own products through a rule ``rule(module, inputs, output) -> MACs`` that counts
the work of the module itself, not of its children (those have their own rules). Built in: linear layers,
convolutions of any dimension, stride, padding, dilation and groups (transposed too), and vitlab's attention (the two
token-by-token products; its projections are linear children). A module can instead define
``macs(inputs, output) -> int`` for its own work, or a new type can be added with :func:`register_mac_rule`; a
backbone written elsewhere needs nothing as long as it is made of these layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.families import model_from_config
from ..models.vit import Attention

MacRule = Callable[[nn.Module, tuple, object], int]
_RULES: dict[type, MacRule] = {}


def register_mac_rule(module_type: type, rule: MacRule | None = None):
    """Register ``rule(module, inputs, output) -> int`` (the module's own MACs for the whole batch) for
    ``module_type`` and its subclasses. Usable as a decorator: ``@register_mac_rule(MyLayer)``."""
    def add(fn: MacRule) -> MacRule:
        _RULES[module_type] = fn
        return fn

    return add(rule) if rule is not None else add


def rule_for(module: nn.Module) -> MacRule | None:
    """The counting rule for a module: its own ``macs`` method, else the rule of its nearest registered class."""
    own = getattr(module, "macs", None)
    if callable(own):
        return lambda m, inputs, output: int(own(inputs, output))
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


@register_mac_rule(nn.Linear)
def linear_macs(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    """rows x in x out, rows = every leading dimension of the input."""
    rows = output.numel() // module.out_features
    return rows * module.in_features * module.out_features


@register_mac_rule(nn.modules.conv._ConvNd)
def conv_macs(module: nn.modules.conv._ConvNd, inputs: tuple, output: torch.Tensor) -> int:
    """Each output value of a convolution takes (in / groups) x kernel-volume MACs; a transposed convolution
    spreads each input value over (out / groups) x kernel-volume outputs."""
    kernel = math.prod(module.kernel_size)
    if module.transposed:
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    return output.numel() * (module.in_channels // module.groups) * kernel


@register_mac_rule(Attention)
def attention_macs(module: Attention, inputs: tuple, output) -> int:
    """Scores q k^T and the weighted sum of values: 2 N^2 D per image (the projections are linear children)."""
    x = inputs[0]
    batch, tokens, dim = x.shape
    return 2 * batch * tokens * tokens * dim


@dataclass
class MacCount:
    """Forward MACs of one image: ``total`` and the count of each module that does products (dotted names)."""

    total: int
    by_module: dict[str, int] = field(default_factory=dict)

    def by_prefix(self, depth: int = 1) -> dict[str, int]:
        """Counts summed over the first ``depth`` parts of the module names (``blocks.0.attn.qkv`` -> ``blocks``)."""
        out: dict[str, int] = {}
        for name, macs in self.by_module.items():
            key = ".".join(name.split(".")[:depth]) or "(model)"
            out[key] = out.get(key, 0) + macs
        return out


def count_macs(model: nn.Module, input_shape: tuple[int, ...], exclude: tuple[str, ...] = ()) -> MacCount:
    """Run ``model`` on one input of ``input_shape`` (no batch dimension) and count its MACs per image.

    The model may live on the meta device (nothing is computed, any size is instant) or on a real one (one real
    forward). Modules whose name is in ``exclude`` or starts with one of them plus a dot are left out.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counts: dict[str, int] = {}
    handles = []

    def skipped(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    for name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None or skipped(name):
            continue

        def hook(mod, inputs, output, name=name, rule=rule):
            counts[name] = counts.get(name, 0) + int(rule(mod, inputs, output))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return MacCount(total=sum(counts.values()), by_module=counts)


HEAD_MODULES = ("head", "head_proj", "pre_logits", "fc_norm")


def count_config_macs(cfg, include_head: bool = True) -> int:
    """Forward MACs per image of the model ``cfg`` builds, counted on the meta device. ``include_head=False``
    leaves out the classifier and pre-logits layer (modules named ``head`` / ``pre_logits``)."""
    with torch.device("meta"):
        model = model_from_config(cfg)
    img = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    count = count_macs(model, (cfg.in_chans, *img), exclude=() if include_head else HEAD_MODULES)
    return count.total
