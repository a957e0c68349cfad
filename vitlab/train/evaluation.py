"""Mixed precision for training and evaluation forwards: ``autocast_context(device, precision)``.

Evaluation itself is :func:`vitlab.evaluate.evaluate_classifier`, the one classification evaluator.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision='bf16'``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
