"""Compute accounting (analytic and counted FLOPs, pre-training exaFLOPs, accelerator days), benchmarks, the CPU
fast path for Linear layers (:func:`set_onednn_linear`) and token merging (:func:`merge_tokens`)."""

from .counting import MacCount, count_config_macs, count_macs, register_mac_rule, rule_for
from .flops import (
    ACCELERATOR_PEAK_FLOPS,
    DATASET_IMAGES,
    TABLE6,
    accelerator_days,
    forward_macs,
    implied_mfu,
    pretraining_exaflops,
    table6_reproduction,
    vit_macs_breakdown,
)
from .memory import TrainingMemory, activation_bytes_per_image, max_micro_batch, training_memory
from .onednn import OneDnnLinear, onednn_linear_available, onednn_linear_default, set_onednn_linear
from .tome import merge_tokens, token_counts

__all__ = [
    "ACCELERATOR_PEAK_FLOPS",
    "DATASET_IMAGES",
    "TABLE6",
    "MacCount",
    "OneDnnLinear",
    "TrainingMemory",
    "activation_bytes_per_image",
    "max_micro_batch",
    "merge_tokens",
    "onednn_linear_available",
    "onednn_linear_default",
    "set_onednn_linear",
    "training_memory",
    "accelerator_days",
    "count_config_macs",
    "count_macs",
    "forward_macs",
    "implied_mfu",
    "pretraining_exaflops",
    "register_mac_rule",
    "rule_for",
    "table6_reproduction",
    "token_counts",
    "vit_macs_breakdown",
]
