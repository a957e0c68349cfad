"""Self-supervised pre-training: masked patch prediction (paper section 4.6, appendix B.1.2)."""

from .mpp import MaskedPatchPrediction, corrupt_patches, mean_colour_targets

__all__ = ["MaskedPatchPrediction", "corrupt_patches", "mean_colour_targets"]
