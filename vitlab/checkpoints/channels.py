"""Adapting a checkpoint's input layer to another channel count (an RGB model fine-tuned on grey images, a grey
model on colour ones), as timm's ``adapt_input_conv`` does.

The first convolution's kernel (O, I, kh, kw) becomes (O, C, kh, kw):

- ``C == 1``: the sum over the I input channels. A grey image then gives exactly what the original model gives for
  that image replicated to I channels (the convolution is linear in its input).
- otherwise: the I channels repeated cyclically up to C, truncated, and scaled by I / C. For 1 -> 3 every colour
  channel gets a third of the grey kernel, so an RGB image gives what the grey model gives for its channel mean, and
  a grey image replicated to 3 channels gives what the grey model gives for the grey image. For 3 -> C this is
  timm's rule; timm handles only 3-channel sources, the same formula serves any I here.

The rest of the network is unchanged. The preprocessing record follows: per-channel mean and std are averaged
(to one channel) or repeated (to more); the equalities above hold exactly when the source's channels share one
mean and std (ViTs' 0.5 / 0.5), approximately otherwise (torchvision's ImageNet statistics).
"""

from __future__ import annotations

import torch

from ..errors import InvalidValueError
from ..models import metadata_of
from ..preprocessing import Preprocessing

# the state-dict key of the kernel that reads the image, per architecture (hybrid stems first: their patch_embed.proj
# reads the ResNet's feature map, not the image)
INPUT_CONV_KEYS = (
    "patch_embed.backbone.stem.conv.weight",  # hybrid ViT with ResNet stages
    "patch_embed.backbone.conv.weight",       # hybrid ViT with the stem alone (R+ViT-Ti/16)
    "stem.conv.weight",                       # BiT ResNet-v2 classifier
    "patch_embed.proj.weight",                # plain ViT: the patch embedding E
)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The convolution kernel ``weight`` (O, I, kh, kw) adapted to ``in_chans`` input channels (see the module
    docstring); computed in float32, returned in the input dtype. ``in_chans == I`` returns a copy."""
    if weight.ndim != 4:
        raise InvalidValueError(f"expected a convolution kernel (out, in, kh, kw), got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise InvalidValueError(f"in_chans must be positive, got {in_chans}")
    source = weight.shape[1]
    w = weight.float()
    if in_chans == source:
        out = w.clone()
    elif in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // source)  # ceil
        out = w.repeat(1, repeats, 1, 1)[:, :in_chans] * (source / in_chans)
    return out.to(weight.dtype)


def input_conv_key(state_dict: dict[str, torch.Tensor], in_chans: int) -> str:
    """The key of the kernel that reads the image: the first of :data:`INPUT_CONV_KEYS` present whose input
    dimension is ``in_chans`` (the model's current channel count)."""
    for key in INPUT_CONV_KEYS:
        value = state_dict.get(key)
        if value is not None and value.ndim == 4 and value.shape[1] == in_chans:
            return key
    raise InvalidValueError(f"no input convolution with {in_chans} input channels among {', '.join(INPUT_CONV_KEYS)}")


def adapt_state_dict_channels(state_dict: dict[str, torch.Tensor], source_chans: int,
                              in_chans: int) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose input convolution takes ``in_chans`` channels instead of ``source_chans``."""
    out = dict(state_dict)
    if in_chans != source_chans:
        key = input_conv_key(state_dict, source_chans)
        out[key] = adapt_input_conv(state_dict[key], in_chans)
    return out


def adapt_preprocessing_channels(pre: Preprocessing | None, in_chans: int) -> Preprocessing | None:
    """``pre`` for ``in_chans`` channels: mean and std averaged over the channels (to 1) or repeated cyclically (to
    more, e.g. RGB's three values then R's again for a fourth band). None when there is none."""
    if pre is None or in_chans < 1:
        return None
    if pre.channels == in_chans:
        return pre
    if in_chans == 1:
        mean, std = (sum(pre.mean) / len(pre.mean),), (sum(pre.std) / len(pre.std),)
    else:
        mean = tuple(pre.mean[i % len(pre.mean)] for i in range(in_chans))
        std = tuple(pre.std[i % len(pre.std)] for i in range(in_chans))
    return pre.replace(channels=in_chans, mean=mean, std=std)


def adapt_model_channels(model: torch.nn.Module, in_chans: int) -> torch.nn.Module:
    """A model of the same class taking ``in_chans``-channel images, with ``model``'s weights and its input
    convolution adapted (:func:`adapt_input_conv`); ``preprocessing`` and ``class_names`` attributes follow. Returns
    ``model`` itself when it already takes ``in_chans`` channels."""
    cfg = model.cfg
    if cfg.in_chans == in_chans:
        return model
    state = adapt_state_dict_channels(model.state_dict(), cfg.in_chans, in_chans)
    param = next(model.parameters())
    adapted = type(model)(cfg.replace(in_chans=in_chans)).to(param.device, param.dtype)
    adapted.load_state_dict(state, strict=True)
    adapted.train(model.training)
    meta = metadata_of(model)
    adapted.preprocessing = adapt_preprocessing_channels(model.preprocessing, in_chans) if meta.preprocessing_known \
        else None
    adapted.class_names = meta.class_names
    return adapted
