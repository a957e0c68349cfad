"""Self-supervised pre-training: masked patch prediction (paper section 4.6, appendix B.1.2) and the masked
autoencoder (He et al. 2022)."""

from .mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from .mpp import MaskedPatchPrediction, corrupt_patches, mean_colour_targets
from .pretrain import MaskedAutoencoderObjective, MaskedPatchObjective, pretrain_mae, pretrain_mpp

__all__ = ["MaskedAutoencoder", "MaskedAutoencoderObjective", "MaskedPatchObjective", "MaskedPatchPrediction",
           "corrupt_patches", "mean_colour_targets", "patchify", "pretrain_mae", "pretrain_mpp", "random_masking",
           "unpatchify"]
