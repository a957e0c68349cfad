"""Patch dropout: train on a random subset of each image's patch tokens (Liu et al., 2022, "PatchDropout").

The encoder's cost grows with the number of tokens, so keeping a fraction ``keep`` of the patch tokens per training
image makes a step roughly ``1 / keep`` times cheaper; the model itself is unchanged and is evaluated on all tokens.
Tokens are dropped after the position embedding is added (each kept token still knows where it came from); the
class token, when there is one, is always kept. Which tokens an image keeps is drawn from the sample's key
(:mod:`vitlab.data.sample_random`) when the training step passes ``sample_keys``, so that it does not depend on the
process or micro-batch that holds the image.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import sample_random as SR
from ..errors import InvalidValueError


class PatchDropoutForward(nn.Module):
    """Wraps a :class:`~vitlab.models.VisionTransformer` for training: in training mode the forward keeps a random
    ``keep`` fraction of the patch tokens of each image (at least one); in eval mode it is the model's own forward.
    Holds no parameters of its own (its state dict is the model's under the prefix ``vit.``)."""

    def __init__(self, vit: nn.Module, keep: float):
        super().__init__()
        if not 0.0 < keep <= 1.0:
            raise InvalidValueError(f"patch dropout must leave a fraction of tokens in (0, 1], got keep={keep}")
        self.vit = vit
        self.keep = keep

    def forward(self, x: torch.Tensor, sample_keys: torch.Tensor | None = None,
                all_tokens: bool = False) -> torch.Tensor:
        """``sample_keys`` (B,): each image's key for its draw (else torch's global generator); ``all_tokens``: keep
        every token this time (the end of a run with ``full_token_epochs``)."""
        vit = self.vit
        if not self.training or self.keep >= 1.0 or all_tokens:
            return vit(x)
        grid = vit.input_grid(x)
        tokens = vit.embed(x)  # (B, prefix + N, D), position embedding added
        prefix = vit.num_prefix_tokens
        B, total, D = tokens.shape
        n = total - prefix
        kept = max(1, int(round(n * self.keep)))
        # a random subset per image: the indices of the `kept` smallest of N uniform draws
        draws = (SR.keyed_uniform(sample_keys.to(x.device), n, SR.PATCH_DROPOUT) if sample_keys is not None
                 else torch.rand(B, n, device=x.device))
        patches = draws.argsort(dim=1)[:, :kept]
        rope = vit.rotary_embedding(grid, patches)  # pos_embed='rope': the kept patches' rotary embedding
        order = patches + prefix
        if prefix:
            order = torch.cat([torch.arange(prefix, device=x.device).expand(B, prefix), order], dim=1)
        tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, D))
        for block in vit.blocks:
            tokens = vit.run_block(block, tokens, rope)
        return vit.forward_head(vit.norm(tokens))
