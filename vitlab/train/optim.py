"""Optimisers, learning-rate schedules and weight averaging as the paper uses them.

- Weight decay is decoupled (AdamW) and applied to weight matrices / kernels only (linear and convolution weights,
  including the head), never to biases, LayerNorm parameters, the class token or position embeddings (big_vision
  decays kernels only).
- Schedules: linear warmup from 0 over ``warmup_steps``, then cosine, linear or constant decay to
  ``lr x end_lr_factor`` at the last step. Implemented with ``LambdaLR`` so that the scheduler state is plain numbers.
- :class:`EMA`: Polyak averaging of all parameters and buffers (the paper's fine-tuning uses factor 0.9999).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..errors import InvalidValueError
from .muon import MuonAdamW, muon_parameter_ids, split_groups
from .transfer import layer_decay_groups


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: weights with two or more dimensions of linear and
    convolution layers (position embeddings, class token, norms and biases are excluded)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Conv3d)) and module.weight is not None:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: decayed weight matrices and everything else (weight_decay 0)."""
    decay_names = decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = name.replace("_orig_mod.", "").replace("module.", "")
        (decay if clean in decay_names or name in decay_names else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9,
                    layer_decay: float | None = None, fused: bool = False,
                    muon_momentum: float = 0.95) -> torch.optim.Optimizer:
    """``adamw``: Adam with decoupled weight decay on weight matrices; ``sgd``: SGD with momentum (the paper's
    fine-tuning, weight decay usually 0); ``muon``: Muon (momentum ``muon_momentum``) for the hidden weight matrices
    and AdamW for the rest, at one learning rate (:mod:`vitlab.train.muon`; ``fused`` gives it the device-side
    skip). Frozen parameters (``requires_grad=False``) are left out: no state, no decay. ``layer_decay`` (BEiT / MAE
    layer-wise learning-rate decay) gives layer l the learning rate ``lr x layer_decay^(L + 1 - l)``
    (:func:`vitlab.train.transfer.layer_decay_groups`). ``fused``: torch's fused implementation, which also takes a
    gradient scaler's ``found_inf`` tensor and skips the update on the device (its rounding differs from the unfused
    one's in the last bit)."""
    if layer_decay is not None and layer_decay != 1.0:

        groups = layer_decay_groups(model, weight_decay, layer_decay, lr, decay_parameter_names(model))
    else:
        groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    if name == "muon":
        return MuonAdamW(split_groups(groups, muon_parameter_ids(model)), lr=lr, betas=tuple(betas),
                         weight_decay=weight_decay, momentum=muon_momentum, device_side_skip=fused)
    raise InvalidValueError(f"optimizer must be adamw, sgd or muon, got {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, end_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based; the factor used *for* that step).

    Warmup: (step + 1) / warmup_steps. Then with progress p in [0, 1] over the remaining steps: cosine
    ``end + (1 - end) (1 + cos(pi p)) / 2``, linear ``1 - (1 - end) p``, constant 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1.0 - end_factor) * progress
    raise InvalidValueError(f"schedule must be cosine, linear or constant, got {schedule!r}")


class _Factor:
    """Picklable LambdaLR function (LambdaLR stores only numbers in its state dict either way)."""

    def __init__(self, total: int, warmup: int, schedule: str, end: float):
        self.total, self.warmup, self.schedule, self.end = total, warmup, schedule, end

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.schedule, self.end)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
                    end_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler; call ``step()`` after each optimiser step."""
    lr_factor(0, total_steps, warmup_steps, schedule, end_factor)  # validate the schedule name now
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(total_steps, warmup_steps, schedule, end_factor))


class EMA:
    """Exponential moving average of a model's parameters and floating-point buffers.

    After each optimiser step ``update(model, step)`` sets ``avg = d * avg + (1 - d) * current`` with
    ``d = decay``, or ``min(decay, (1 + step) / (10 + step))`` with ``warmup`` so that early averages are not
    dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise InvalidValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.current_decay(step)
        avg = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = avg[name]
            if target.dtype.is_floating_point:
                target.lerp_(value.to(target.dtype), 1.0 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
