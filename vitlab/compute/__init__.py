"""Compute accounting (analytic and counted FLOPs, pre-training exaFLOPs, accelerator days) and benchmarks."""

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

__all__ = [
    "ACCELERATOR_PEAK_FLOPS",
    "DATASET_IMAGES",
    "TABLE6",
    "MacCount",
    "TrainingMemory",
    "activation_bytes_per_image",
    "max_micro_batch",
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
    "vit_macs_breakdown",
]
