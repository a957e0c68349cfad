"""Muon for the encoder's weight matrices, AdamW for every other parameter, as one optimiser.

Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers in neural networks") keeps a Nesterov momentum of
each weight matrix's gradient and replaces the update by its nearest semi-orthogonal matrix (all singular values
about 1), computed with a few quintic Newton-Schulz iterations; the update then moves every direction of the matrix
by a similar amount instead of following the few largest singular directions of the gradient. It is meant for the
hidden matrices only: the patch embedding, the classifier head, norms, biases, the class token and position
embeddings stay with AdamW (:func:`muon_parameter_ids` says which is which).

Learning rate and weight decay are AdamW's: a matrix's orthogonalised update is scaled by ``0.2 sqrt(max(rows,
cols))``, which gives it about the root-mean-square size of an AdamW update (Liu et al., 2025, "Muon is Scalable
for LLM Training"), so one ``lr`` and one schedule drive both kinds of parameter. Weight decay is decoupled for both
(``p <- p (1 - lr wd)``), on the groups :func:`vitlab.train.optim.parameter_groups` decays.

The Newton-Schulz iteration runs in float32 (reduced-precision products are emulated, hence slow, on many CPUs), on
all matrices of one shape at once (batched products). Its cost is a few small products per matrix and step,
independent of the batch size: on one CPU thread (Intel Xeon) it made a step of the main job's model 1.14 times as
costly per image on 64-image micro-batches and 1.035 times on 128-image ones (``benchmarks/step_cost.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.optim.adam import adam

# the quintic iteration's coefficients: chosen to push small singular values up fast (Jordan et al., 2024)
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(updates: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` of each matrix ``U S V^T`` in ``updates`` (a matrix or a batch ``(n, rows, cols)``):
    ``steps`` quintic Newton-Schulz iterations after scaling each matrix to Frobenius norm 1. The singular values
    come out in about [0.68, 1.2] rather than exactly 1 (the coefficients trade exactness for speed)."""
    a, b, c = NEWTON_SCHULZ
    x = updates.float().reshape(-1, *updates.shape[-2:])
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # (aI + bA + cA^2) x
    return (x if wide else x.mT).reshape(updates.shape)


def muon_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of the parameters Muon updates: the trainable weight matrices of linear layers, except an output
    layer (a module named ``head``, the classifier). Convolutions (the patch embedding, a hybrid's ResNet), biases,
    norms, tokens and position embeddings are left to AdamW."""
    ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "head" and module.weight.requires_grad:
            ids.add(id(module.weight))
    return ids


def split_groups(groups: list[dict], muon_ids: set[int]) -> list[dict]:
    """Each parameter group split in two, the Muon matrices (``muon=True``) and the rest; the other keys (weight
    decay, a layer-decay learning-rate scale) are kept on both halves. Empty halves are dropped."""
    out = []
    for group in groups:
        for use_muon in (True, False):
            params = [p for p in group["params"] if (id(p) in muon_ids) == use_muon]
            if params:
                out.append({**group, "params": params, "muon": use_muon})
    return out


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser over groups marked ``muon`` (Muon with Nesterov momentum ``momentum``) and the rest (AdamW with
    ``betas`` and ``eps``, by torch's own Adam kernels: ``torch.optim.AdamW(foreach=True)`` bit for bit, or its
    ``fused=True`` with ``device_side_skip``). A learning-rate scheduler and checkpoints see one optimiser; its state
    holds ``momentum_buffer`` for a Muon matrix and ``step``, ``exp_avg``, ``exp_avg_sq`` for an AdamW parameter.

    ``device_side_skip``: the step takes the decision to skip as the ``found_inf`` tensor (1 = skip) that torch's
    fused optimisers take, set as an attribute by vitlab's training step or a ``GradScaler``, and applies it on the
    device (a skipped step leaves weights and state exactly as they were; the AdamW half is then torch's fused
    kernel, its step counts device tensors), so that a step never waits for the device. It announces this as
    ``defaults["fused"]``, the flag those callers look for."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 device_side_skip: bool = False):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, muon=False, fused=device_side_skip)
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = device_side_skip  # a GradScaler then passes found_inf / grad_scale
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups must hold weight matrices (2-D parameters) only")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (none of them where ``self.found_inf`` is 1)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not group["muon"]:
                self._adamw_step(group, params, found_inf, grad_scale)
            elif found_inf is None:
                self._muon_step(group, params)
            else:
                keep = 1.0 - found_inf.float()  # on the parameters' device (as torch's fused step expects)
                # the gradients of a skipped step may be inf / NaN: zeroed, then weighted by keep = 0
                grads = [torch.nan_to_num(p.grad if grad_scale is None else p.grad / grad_scale, 0.0, 0.0, 0.0)
                         for p in params]
                self._muon_step(group, params, grads, keep)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor] | None = None,
                   keep: torch.Tensor | None = None) -> None:
        """Muon on ``params``; with ``keep`` (a device scalar, 0 = skip) every change is weighted by it."""
        lr, mu = group["lr"], group["momentum"]
        grads = [p.grad for p in params] if grads is None else grads
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        if keep is None:
            torch._foreach_lerp_(buffers, grads, 1.0 - mu)
        else:
            for buffer, grad in zip(buffers, grads):
                buffer.lerp_(grad, keep * (1.0 - mu))
        nesterov = torch._foreach_lerp(grads, buffers, mu)  # g + mu (m - g): the momentum looked one step ahead
        if group["weight_decay"]:
            decay = 1.0 - lr * group["weight_decay"]
            torch._foreach_mul_(params, decay if keep is None else 1.0 - keep * (lr * group["weight_decay"]))
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for index, p in enumerate(params):
            by_shape[tuple(p.shape)].append(index)
        for shape, indices in by_shape.items():
            ortho = orthogonalize(torch.stack([nesterov[i] for i in indices]), group["ns_steps"])
            scale = 0.2 * math.sqrt(max(shape))  # the RMS of an AdamW update (Liu et al., 2025)
            if keep is not None:
                ortho = ortho * keep
            torch._foreach_add_([params[i] for i in indices], list(ortho.to(params[indices[0]].dtype).unbind(0)),
                                alpha=-lr * scale)

    def _adamw_step(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None,
                    grad_scale: torch.Tensor | None) -> None:
        """AdamW on ``params`` by torch's own functional Adam with decoupled weight decay: its foreach kernels, or
        with ``device_side_skip`` its fused one, which skips where ``found_inf`` is 1 and divides by
        ``grad_scale`` on the device (the step counts then live there too, as in ``torch.optim.AdamW(fused=True)``)."""
        fused = bool(group["fused"])
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, foreach=not fused,
             fused=fused or None, grad_scale=grad_scale, found_inf=found_inf, decoupled_weight_decay=True,
             amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=False)
