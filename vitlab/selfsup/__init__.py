"""Self-supervised pre-training: masked patch prediction (paper section 4.6, appendix B.1.2)."""

from .mpp import MaskedPatchPrediction, corrupt_patches, mean_colour_targets
from .pretrain import MaskedPatchObjective, pretrain_mpp

__all__ = ["MaskedPatchObjective", "MaskedPatchPrediction", "corrupt_patches", "mean_colour_targets", "pretrain_mpp"]
