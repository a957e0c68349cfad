"""Masked autoencoder (He et al., CVPR 2022, "Masked Autoencoders Are Scalable Vision Learners").

Per image, a random 75% of the patch tokens is dropped: uniform noise per token, the tokens of lowest noise are
kept (argsort, as the paper's code and transformers' ``ViTMAEForPreTraining`` do, so that the same ``noise`` gives
the same masking). The ViT's own encoder (patch embedding and position embedding, prefix tokens, blocks, final norm)
sees the visible tokens only; a light decoder (linear to the decoder width, a learned [mask] token in every dropped
place, fixed 2-D sin-cos position embeddings, pre-norm blocks, norm, linear to the patch's pixels) reconstructs every
patch, and the loss is the mean squared error over the dropped patches only, against each patch's pixels normalised
by their own mean and variance (``norm_pix_loss``, the paper's default). After pre-training the decoder is thrown
away and the ViT is fine-tuned as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidValueError
from ..models import VisionTransformer
from ..models.vit import Block, PatchEmbed, ViTConfig, sincos_2d_position_embedding


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens per image: ``floor(N * (1 - mask_ratio))`` as in the paper's code (49 of 196 at 0.75); the
    small epsilon keeps float error (1 - 0.9 = 0.0999...) from losing a token."""
    return max(1, int(num_patches * (1.0 - mask_ratio) + 1e-9))


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-token noise (B, N): (kept token indices (B, keep), in order of increasing noise; the mask (B, N)
    float, 1 where a token is dropped; the order (B, N) that puts ``[kept..., dropped...]`` back in place)."""
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones_like(noise, dtype=torch.float32)
    mask[:, :keep] = 0
    return shuffle[:, :keep], mask.gather(1, restore), restore


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C): each patch's pixels row by row with the channels last (the order of the
    paper's code and of transformers' ``ViTMAEForPreTraining.patchify``), patches in row-major grid order."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    x = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, ph * pw * C) -> (B, C, gh * ph, gw * pw)."""
    B, _, K = patches.shape
    (ph, pw), (gh, gw) = patch_size, grid
    C = K // (ph * pw)
    x = patches.reshape(B, gh, gw, ph, pw, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, gh * ph, gw * pw)


def normalised_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels less their mean, over the square root of their (unbiased) variance + ``eps``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


class MaskedAutoencoder(nn.Module):
    """A ViT encoder and MAE's light decoder. ``forward(images)`` returns the reconstruction loss (a scalar), so the
    module trains like any model whose output is its loss; :meth:`predict` returns the pieces.

    ``vit`` is the encoder that is fine-tuned afterwards: a plain patch-embedding ViT, with or without a class token,
    distillation or register tokens (all of them pass through the decoder like the class token does in the paper);
    a hybrid (a ResNet stem would see the dropped patches through its receptive field) and ``pool='map'`` (its
    pooling head would get no gradient) are refused. Decoder defaults are the paper's for ViT-B/L/H: width 512,
    depth 8, 16 heads, MLP 4x; a small ViT wants a small one."""

    def __init__(self, vit: VisionTransformer, mask_ratio: float = 0.75, decoder_width: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, decoder_mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"a masked autoencoder needs a VisionTransformer, got {type(vit).__name__}")
        cfg = vit.cfg
        if not isinstance(vit.patch_embed, PatchEmbed):
            raise InvalidValueError("a masked autoencoder needs a plain patch-embedding ViT, not a hybrid (its "
                                    "convolutional stem would see the masked patches)")
        if cfg.pool == "map":
            raise InvalidValueError("a masked autoencoder does not support pool='map' (the attention-pooling head "
                                    "is unused in pre-training); pre-train with pool='token' or 'gap'")
        if not 0.0 <= mask_ratio < 1.0:
            raise InvalidValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        if decoder_width % 4 or decoder_width % decoder_heads or decoder_depth < 0:
            raise InvalidValueError(f"decoder width {decoder_width} must be divisible by 4 (sin-cos position "
                                    f"embedding) and by the {decoder_heads} decoder heads; depth >= 0")
        self.vit = vit
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.patch_size = tuple(cfg.patch_size)
        D, W = cfg.embed_dim, decoder_width
        self.decoder_embed = nn.Linear(D, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        decoder_cfg = ViTConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                num_classes=0, embed_dim=W, depth=decoder_depth, num_heads=decoder_heads,
                                mlp_dim=int(W * decoder_mlp_ratio), norm_eps=cfg.norm_eps)
        self.decoder_cfg = decoder_cfg
        self.decoder_blocks = nn.ModuleList([Block(decoder_cfg) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(W, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(W, self.patch_size[0] * self.patch_size[1] * cfg.in_chans)
        # fixed, not learned (the paper's): rebuilt, not saved
        self.register_buffer("decoder_pos_embed", sincos_2d_position_embedding(cfg.grid_size, W), persistent=False)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """The paper's initialisation: Xavier-uniform linear weights, zero biases, the [mask] token normal(0.02)."""
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def cfg(self):
        """The encoder's config (input size, channels), so that the wrapper can stand where the ViT stood."""
        return self.vit.cfg

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoded visible tokens (B, prefix + K, D) after the final norm, mask (B, N), restore order (B, N)).
        ``noise`` (B, N): the masking's noise (default uniform, from ``generator``)."""
        vit = self.vit
        grid = vit.input_grid(images)
        tokens = vit.patch_embed(vit.pad_input(images))  # (B, N, D)
        B, N, _ = tokens.shape
        if noise is None:
            noise = torch.rand(B, N, device=tokens.device, generator=generator)
        elif noise.shape != (B, N):
            raise InvalidValueError(f"noise must be (batch, patches) = ({B}, {N}), got {tuple(noise.shape)}")
        keep, mask, restore = random_masking(noise.to(tokens.device), keep_count(N, self.mask_ratio))
        x = vit.embed_tokens(tokens, grid, keep=keep)
        rope = vit.rotary_embedding(grid, keep)  # pos_embed='rope': the visible patches' rotary embedding
        for block in vit.blocks:
            x = vit.run_block(block, x, rope)
        # the final norm on every token (timm's fc_norm, when the ViT normalises after pooling)
        x = vit.fc_norm(x) if vit.cfg.norm_after_pool else vit.norm(x)
        return x, mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor,
                        grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Predicted pixels of every patch (B, N, ph * pw * C) from the encoder's output and the restore order."""
        x = self.decoder_embed(latent)
        P = self.vit.num_prefix_tokens
        prefix, visible = x[:, :P], x[:, P:]
        B, N, W = x.shape[0], restore.shape[1], x.shape[2]
        full = torch.cat([visible, self.mask_token.to(x.dtype).expand(B, N - visible.shape[1], W)], dim=1)
        full = full.gather(1, restore.unsqueeze(-1).expand(-1, -1, W))
        pos = self.decoder_pos_embed
        if grid is not None and tuple(grid) != tuple(self.cfg.grid_size):
            pos = sincos_2d_position_embedding(tuple(grid), W).to(pos)
        x = torch.cat([prefix, full + pos.to(x.dtype)], dim=1)  # prefix tokens: no position (the paper's zero row)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs: (B, N, ph * pw * C), per-patch normalised with ``norm_pix_loss``."""
        patches = patchify(self.vit.pad_input(images).float(), self.patch_size)
        return normalised_targets(patches) if self.norm_pix_loss else patches

    def predict(self, images: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predicted pixels (B, N, ph * pw * C), targets (same shape), mask (B, N): 1 where a patch was dropped)."""
        latent, mask, restore = self.forward_encoder(images, noise, generator)
        pred = self.forward_decoder(latent, restore, self.vit.input_grid(images))
        return pred, self.targets(images), mask

    @staticmethod
    def masked_error(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed per-patch mean squared error over the dropped patches, number of dropped patches)."""
        per_patch = (pred.float() - targets).pow(2).mean(dim=-1)
        return (per_patch * mask).sum(), mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        pred, targets, mask = self.predict(images, noise)
        total, count = self.masked_error(pred, targets, mask)
        return total / count

    @torch.no_grad()
    def reconstruction_error(self, images: torch.Tensor, generator: torch.Generator | None = None
                             ) -> tuple[float, int]:
        """(summed squared error per dropped patch, number of dropped patches) for one batch."""
        total, count = self.masked_error(*self.predict(images, generator=generator))
        return total.item(), int(count.item())


def decoder_options(model_cfg, width: int | None = None, depth: int | None = None, heads: int | None = None
                    ) -> dict:
    """Decoder width / depth / heads: the given ones, else the paper's 512 / 8 / 16 for encoders of width >= 512
    and, for small ViTs, the encoder's width, 2 blocks and its heads (a decoder wider than the encoder would hold
    most of the compute)."""
    small = model_cfg.embed_dim < 512
    return {"decoder_width": width or (model_cfg.embed_dim if small else 512),
            "decoder_depth": depth if depth is not None else (2 if small else 8),
            "decoder_heads": heads or (model_cfg.num_heads if small else 16)}
