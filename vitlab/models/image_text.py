"""A two-tower image-text model: a ViT image tower and a text tower embedding into one space (CLIP / SigLIP).

The image tower is the :class:`~vitlab.models.VisionTransformer` ``vitlab.load`` gives for the checkpoint (CLIP: its
``head`` is the visual projection; SigLIP: the attention-pooling head, no projection); the text tower is a
:class:`~vitlab.models.text.TextTransformer`. Both embeddings are L2-normalised and compared by a scaled dot product:
CLIP's softmax over texts uses ``exp(logit_scale)``; SigLIP's sigmoid adds ``logit_bias``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast
from ..errors import InvalidValueError, VitlabError
from .text import TextTransformer

LOG_10 = math.log(10)  # CLIP's and SigLIP's initial logit scale is 10


class ImageTextModel(nn.Module):
    """``visual`` + ``text`` towers, ``logit_scale`` (the log of the scale, as the checkpoints store it),
    ``logit_bias`` (SigLIP; None for CLIP) and ``tokenizer`` (a :class:`vitlab.models.tokenizer.TextTokenizer` or
    None: then :meth:`tokenize` is refused and token ids are passed directly). ``notes``: what the checkpoint
    reader assumed or dropped (as :func:`vitlab.read_checkpoint`'s)."""

    def __init__(self, visual: nn.Module, text: TextTransformer, *, logit_scale: float | torch.Tensor = LOG_10,
                 logit_bias: float | torch.Tensor | None = None, tokenizer=None, notes: list[str] | None = None):
        super().__init__()
        image_dim = _output_width(visual)
        if image_dim != text.cfg.out_dim:
            raise InvalidValueError(f"the image tower's embedding width {image_dim} differs from the text tower's "
                                    f"{text.cfg.out_dim}; the two must embed into one space")
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=torch.float32).clone())
        self.logit_bias = None if logit_bias is None else \
            nn.Parameter(torch.as_tensor(logit_bias, dtype=torch.float32).clone())
        self.tokenizer = tokenizer
        self.notes = list(notes or [])  # what the checkpoint reader assumed or dropped

    @property
    def preprocessing(self):
        """The image tower's evaluation preprocessing (what its source documents)."""
        return getattr(self.visual, "preprocessing", None)

    @property
    def embed_dim(self) -> int:
        """The width of the joint embedding space."""
        return self.text.cfg.out_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, C, H, W), preprocessed as :attr:`preprocessing` says -> embeddings (B, P)."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids (B, L) (from :meth:`tokenize`) -> embeddings (B, P)."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Texts -> token ids (B, context_length), padded and truncated as the model's source does."""
        if self.tokenizer is None:
            raise VitlabError("this image-text model has no tokenizer (its source had no tokenizer files); pass "
                              "token ids to encode_text / forward, or load it from a folder or repo with them")
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        return tokens.to(self.logit_scale.device)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised image (Bi, P) and text (Bt, P) embeddings -> logits per image (Bi, Bt)."""
        logits = self.logit_scale.exp() * image_embeds @ text_embeds.t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits per image (B_img, B_txt): ``exp(logit_scale) * img_n @ txt_n.T`` (+ ``logit_bias``). A softmax
        over texts gives CLIP's zero-shot probabilities; a sigmoid gives SigLIP's per-pair ones."""
        return self.logits(self.encode_image(images), self.encode_text(tokens))


def _output_width(visual: nn.Module) -> int:
    """The width of the image tower's output: its head's, else its features' (a tower without a head)."""
    head = getattr(visual, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    cfg = getattr(visual, "cfg", None)
    width = getattr(cfg, "num_classes", 0) or getattr(cfg, "embed_dim", None)
    if width is None:
        raise InvalidValueError(f"cannot tell the output width of a {type(visual).__name__} image tower")
    return width


@torch.no_grad()
def embed_texts(model: ImageTextModel, texts: Sequence[str], batch_size: int = 256,
                precision: str = "fp32") -> torch.Tensor:
    """(M, P) float32 unit text embeddings of ``texts`` by ``model``'s text tower (an :class:`ImageTextModel` with a
    tokenizer), ``batch_size`` at a time on the tower's device, returned on the CPU."""
    param = next(model.text.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start:start + batch_size])).to(device)
        with autocast(device, precision):
            features = model.encode_text(tokens, normalize=False)
        chunks.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.embed_dim)
