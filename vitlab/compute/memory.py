"""Training-memory arithmetic for a plain ViT: weights, gradients, optimiser state and saved activations.

Saved activations per encoder block and image, in bytes (N tokens, D width, M MLP size, fused attention so no N x N
matrix is kept):

- float32: 36 N D + 8 N M. The norm inputs (2 x 4ND), qkv input and output (4ND + 12ND), the attention output and
  its reshaped copy for the projection (2 x 4ND), the fc1 input (4ND), fc1 and GELU outputs (2 x 4NM).
- bf16 autocast: 22 N D + 4 N M. The residual stream and the norms stay float32 (2 x 4ND), every matrix-product
  input or output is bfloat16 (2ND + 6ND + 2ND + 2ND + 2ND, and 2 x 2NM).
- gradient checkpointing per block: only each block's input (4ND, float32) is kept, plus one block's activations
  while it is recomputed in the backward pass.

Measured on the CPU in float32 the first formula is within 5% of PyTorch's allocations (tests/test_compute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.vit import ViTConfig


def block_activation_bytes(cfg: ViTConfig, bf16: bool) -> int:
    """Saved activations of one encoder block for one image, in bytes."""
    N = cfg.num_patches + cfg.num_prefix_tokens
    D, M = cfg.embed_dim, cfg.mlp_dim
    return (22 * N * D + 4 * N * M) if bf16 else (36 * N * D + 8 * N * M)


def activation_bytes_per_image(cfg: ViTConfig, bf16: bool = True, checkpointing: bool = False) -> int:
    """Saved activations of the encoder for one image, in bytes (embedding and head are small and left out)."""
    block = block_activation_bytes(cfg, bf16)
    if not checkpointing:
        return cfg.depth * block
    N = cfg.num_patches + cfg.num_prefix_tokens
    return cfg.depth * 4 * N * cfg.embed_dim + block


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes a training step holds: float32 weights, gradients and AdamW moments, bf16 weight copies made by
    autocast, and the activations of ``batch`` images."""

    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.autocast_copies + self.activations


def training_memory(cfg: ViTConfig, num_params: int, batch: int, bf16: bool = True,
                    checkpointing: bool = False) -> TrainingMemory:
    """Memory of one training step with AdamW (two float32 moments per parameter) at micro-batch ``batch``."""
    return TrainingMemory(
        weights=4 * num_params,
        gradients=4 * num_params,
        optimizer=8 * num_params,
        autocast_copies=2 * num_params if bf16 else 0,
        activations=batch * activation_bytes_per_image(cfg, bf16, checkpointing),
    )


def max_micro_batch(cfg: ViTConfig, num_params: int, memory_bytes: float = 80e9, bf16: bool = True,
                    checkpointing: bool = False, reserve: float = 0.1) -> int:
    """The largest micro-batch whose estimate fits in ``memory_bytes`` with a ``reserve`` share kept free for the
    allocator's fragmentation, workspaces and the CUDA context."""
    fixed = training_memory(cfg, num_params, 0, bf16, checkpointing).total
    free = memory_bytes * (1.0 - reserve) - fixed
    return max(int(free // activation_bytes_per_image(cfg, bf16, checkpointing)), 0)
