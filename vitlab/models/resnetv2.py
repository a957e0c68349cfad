"""BiT ResNet-v2 (Kolesnikov et al. 2020): the paper's convolutional baseline and the backbone of its hybrids.

Two flavours share the modules below:

* BiT classifiers (``preact=True``, ``padding="bit"``): pre-activation bottlenecks, GroupNorm(32) + ReLU before each
  weight-standardised convolution, a final GroupNorm + ReLU, global average pooling and a 1x1-convolution head.
  The stem is a 7x7/2 convolution, then zero padding of one pixel and a 3x3/2 max-pool.
* ViT hybrid backbones (``preact=False``, ``padding="same"``, vit_jax ``models_resnet``): post-activation
  bottlenecks (conv -> GN -> ReLU, the last GN added to the shortcut before the ReLU), GroupNorm + ReLU after the
  stem convolution, TensorFlow "SAME" (asymmetric, input-size dependent) padding in every convolution and the max-pool.

Weight standardisation normalises each output channel's kernel over (in, kh, kw) before the convolution; the stored
weights stay raw. Two epsilon conventions exist: ``ws_eps_mode="var"`` divides by sqrt(var + eps) (BiT, timm, eps
1e-8) and ``"std"`` by (std + eps) (vit_jax, eps 1e-5). GroupNorm epsilon is 1e-5 in timm and 1e-6 in Flax.
The defaults follow timm, whose converted weights users compare with.

Module and parameter names follow timm's ``ResNetV2`` (``stem.conv``, ``stages.{i}.blocks.{j}.conv1``, ``norm``,
``head.fc``), so a timm state dict loads as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidValueError
from .metadata import ModelMetadata
from .vit import ModelInputError, _pair, drop_path, take_indices

PaddingType = Literal["bit", "same"]
WsEpsMode = Literal["var", "std"]


@dataclass(frozen=True)
class ResNetV2Config:
    """Everything that fixes a ResNet-v2's architecture.

    ``layers`` are the bottleneck blocks per stage (R50: (3, 4, 6, 3); an empty tuple is the stem alone).
    ``channels`` are the stages' output widths before ``width_factor`` (bottleneck width is a quarter of that).
    The first stage keeps the stem's resolution, every later stage halves it; the stem reduces by
    ``stem_stride`` and, with ``stem_pool``, by another 2. ``img_size`` is the nominal input size (a CNN takes any
    size; the size is used for compute accounting and preprocessing). ``padding="bit"`` pads symmetrically and
    zero-pads before the stem max-pool (BiT); ``"same"`` uses TF "SAME" padding everywhere (vit_jax hybrids).
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width_factor: int = 1
    channels: tuple[int, ...] = (256, 512, 1024, 2048)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    preact: bool = True
    padding: PaddingType = "bit"
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    gn_groups: int = 32
    gn_eps: float = 1e-5
    ws_eps: float = 1e-8
    ws_eps_mode: WsEpsMode = "var"
    dropout: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        errors = []
        if len(self.layers) > len(self.channels):
            errors.append(f"{len(self.layers)} stages need as many channels, got {len(self.channels)}")
        if any(n <= 0 for n in self.layers):
            errors.append(f"every stage needs at least one block, got layers={self.layers}")
        if self.width_factor < 1:
            errors.append(f"width_factor must be >= 1, got {self.width_factor}")
        widths = [self.stem_width * self.width_factor]
        for c in self.channels[: len(self.layers)]:
            if c % 4:
                errors.append(f"stage width {c} is not divisible by 4 (the bottleneck ratio)")
            widths += [c * self.width_factor, c * self.width_factor // 4]
        if any(w % self.gn_groups for w in widths):
            errors.append(f"every width ({sorted(set(widths))}) must be divisible by gn_groups={self.gn_groups}")
        if self.padding not in ("bit", "same"):
            errors.append(f"padding must be 'bit' or 'same', got {self.padding!r}")
        if self.ws_eps_mode not in ("var", "std"):
            errors.append(f"ws_eps_mode must be 'var' or 'std', got {self.ws_eps_mode!r}")
        if self.stem_kernel < 1 or self.stem_stride < 1:
            errors.append("stem_kernel and stem_stride must be positive")
        if self.num_classes < 0:
            errors.append(f"num_classes must be >= 0, got {self.num_classes}")
        if min(self.img_size) < self.stride:
            errors.append(f"img_size {self.img_size} is smaller than the output stride {self.stride}")
        if errors:
            raise InvalidValueError("invalid ResNet-v2 config: " + "; ".join(errors))

    @property
    def stride(self) -> int:
        """Total down-sampling from the image to the last feature map."""
        return self.stem_stride * (2 if self.stem_pool else 1) * 2 ** max(len(self.layers) - 1, 0)

    @property
    def num_features(self) -> int:
        """Channels of the last feature map (the stem's width when there are no stages)."""
        if not self.layers:
            return self.stem_width * self.width_factor
        return self.channels[len(self.layers) - 1] * self.width_factor

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out.update(img_size=list(self.img_size), layers=list(self.layers), channels=list(self.channels))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ResNetV2Config:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidValueError(f"unknown ResNet-v2 config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> ResNetV2Config:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise InvalidValueError(f"unknown ResNet-v2 config keys: {', '.join(unknown)}")
        return replace(self, **changes)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis: the output has ceil(size / stride) positions and
    the odd pixel of padding, if any, goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) so that a VALID convolution / pool with ``kernel`` and ``stride`` behaves like TF "SAME"."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def standardize_weight(weight: torch.Tensor, eps: float, eps_mode: WsEpsMode = "var") -> torch.Tensor:
    """Weight standardisation: each output channel's kernel to zero mean and unit (population) variance over
    (in, kh, kw). ``eps_mode="var"``: w' = (w - mean) / sqrt(var + eps); ``"std"``: (w - mean) / (std + eps)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    denom = (var + eps).sqrt() if eps_mode == "var" else var.sqrt() + eps
    return ((flat - mean) / denom).reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Bias-free convolution with weight standardisation; ``padding="same"`` pads like TensorFlow, ``"bit"``
    symmetrically by (kernel - 1) // 2."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, padding: PaddingType = "bit",
                 eps: float = 1e-8, eps_mode: WsEpsMode = "var"):
        # stride-1 odd kernels get the same padding either way, so only strided "same" convs pad at run time
        self.dynamic_pad = padding == "same" and (stride != 1 or kernel_size % 2 == 0)
        static = 0 if self.dynamic_pad else (kernel_size - 1) // 2
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=static, bias=False)
        self.eps = eps
        self.eps_mode = eps_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size, self.stride)
        weight = standardize_weight(self.weight, self.eps, self.eps_mode)
        return F.conv2d(x, weight, None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ReLU (or nothing with ``act=False``)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, act: bool = True):
        super().__init__(groups, channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class _Layers:
    """Factories for the convolution and norm every block uses, fixed by a config."""

    def __init__(self, cfg: ResNetV2Config):
        self.cfg = cfg

    def conv(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1) -> StdConv2d:
        return StdConv2d(in_chs, out_chs, kernel, stride, self.cfg.padding, self.cfg.ws_eps, self.cfg.ws_eps_mode)

    def norm(self, channels: int, act: bool = True) -> GroupNormAct:
        return GroupNormAct(channels, self.cfg.gn_groups, self.cfg.gn_eps, act)


class StemPool(nn.Module):
    """The stem's 3x3/2 max-pool: zero padding of one pixel first (BiT) or TF "SAME" padding with -inf (vit_jax)."""

    def __init__(self, padding: PaddingType):
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            x = pad_same(x, (3, 3), (2, 2), value=-math.inf)
        else:
            x = F.pad(x, (1, 1, 1, 1), value=0.0)
        return F.max_pool2d(x, 3, 2)

    def extra_repr(self) -> str:
        return f"padding={self.padding!r}"


class ResNetStem(nn.Module):
    """Root block: a wide strided convolution (7x7/2 by default), GroupNorm + ReLU unless the network is
    pre-activation (then the first block normalises), and the max-pool."""

    def __init__(self, cfg: ResNetV2Config):
        super().__init__()
        layers = _Layers(cfg)
        width = cfg.stem_width * cfg.width_factor
        self.conv = layers.conv(cfg.in_chans, width, cfg.stem_kernel, cfg.stem_stride)
        self.norm = nn.Identity() if cfg.preact else layers.norm(width)
        self.pool = StemPool(cfg.padding) if cfg.stem_pool else nn.Identity()
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


class DownsampleConv(nn.Module):
    """Shortcut projection: 1x1 strided convolution (plus GroupNorm without ReLU in the post-activation form)."""

    def __init__(self, layers: _Layers, in_chs: int, out_chs: int, stride: int, preact: bool):
        super().__init__()
        self.conv = layers.conv(in_chs, out_chs, 1, stride)
        self.norm = nn.Identity() if preact else layers.norm(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class PreActBottleneck(nn.Module):
    """BiT unit: x + conv3(GN-ReLU(conv2(GN-ReLU(conv1(GN-ReLU(x)))))); the stride sits on the 3x3 conv and the
    projection shortcut reads the pre-activated input."""

    def __init__(self, layers: _Layers, in_chs: int, out_chs: int, stride: int, project: bool, drop_path_rate: float):
        super().__init__()
        mid = out_chs // 4
        self.downsample = DownsampleConv(layers, in_chs, out_chs, stride, preact=True) if project else None
        self.norm1 = layers.norm(in_chs)
        self.conv1 = layers.conv(in_chs, mid, 1)
        self.norm2 = layers.norm(mid)
        self.conv2 = layers.conv(mid, mid, 3, stride)
        self.norm3 = layers.norm(mid)
        self.conv3 = layers.conv(mid, out_chs, 1)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.norm1(x)
        shortcut = self.downsample(x_pre) if self.downsample is not None else x
        y = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(x_pre)))))
        return shortcut + drop_path(y, self.drop_path_rate, self.training)


class Bottleneck(nn.Module):
    """vit_jax hybrid unit: ReLU(shortcut + GN(conv3(GN-ReLU(conv2(GN-ReLU(conv1(x))))))), stride on the 3x3."""

    def __init__(self, layers: _Layers, in_chs: int, out_chs: int, stride: int, project: bool, drop_path_rate: float):
        super().__init__()
        mid = out_chs // 4
        self.downsample = DownsampleConv(layers, in_chs, out_chs, stride, preact=False) if project else None
        self.conv1 = layers.conv(in_chs, mid, 1)
        self.norm1 = layers.norm(mid)
        self.conv2 = layers.conv(mid, mid, 3, stride)
        self.norm2 = layers.norm(mid)
        self.conv3 = layers.conv(mid, out_chs, 1)
        self.norm3 = layers.norm(out_chs, act=False)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        y = self.norm3(self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x))))))
        return F.relu(shortcut + drop_path(y, self.drop_path_rate, self.training))


class ResNetStage(nn.Module):
    """A run of bottleneck blocks; the first projects the shortcut and carries the stage's stride."""

    def __init__(self, layers: _Layers, in_chs: int, out_chs: int, depth: int, stride: int, rates: list[float]):
        super().__init__()
        block = PreActBottleneck if layers.cfg.preact else Bottleneck
        self.blocks = nn.Sequential(*[
            block(layers, in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, i == 0, rates[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """Global average pooling, dropout and a 1x1 convolution (BiT's head), zero-initialised."""

    def __init__(self, in_chs: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Conv2d(in_chs, num_classes, 1) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        if pre_logits:
            return x.flatten(1)
        return self.fc(self.drop(x)).flatten(1)


class ResNetV2(nn.Module, ModelMetadata):
    """ResNet-v2 built from a :class:`ResNetV2Config`. ``forward`` returns logits (B, num_classes); with
    ``num_classes=0`` it returns the pooled features (B, num_features). ``preprocessing``, ``class_names`` and
    ``loss`` are the weights' metadata (:class:`~vitlab.models.metadata.ModelMetadata`)."""

    def __init__(self, cfg: ResNetV2Config):
        super().__init__()
        self.cfg = cfg
        layers = _Layers(cfg)
        self.grad_checkpointing = False
        self.stem = ResNetStem(cfg)
        total = sum(cfg.layers)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        prev = self.stem.num_features
        self.stages = nn.Sequential()
        for i, depth in enumerate(cfg.layers):
            out = cfg.channels[i] * cfg.width_factor
            self.stages.add_module(str(i), ResNetStage(layers, prev, out, depth, 1 if i == 0 else 2, rates[:depth]))
            rates = rates[depth:]
            prev = out
        self.num_features = prev
        self.norm = layers.norm(prev) if cfg.preact else nn.Identity()
        self.head = ClassifierHead(prev, cfg.num_classes, cfg.dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal (fan-out) raw kernels, unit / zero GroupNorm; in the post-activation form the last GroupNorm of
        each block starts at zero so that every block starts as the identity (vit_jax); the head is zero."""
        for module in self.modules():
            if isinstance(module, StdConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.norm3.weight)

    def reset_head(self, num_classes: int, drop_pre_logits: bool = True) -> None:
        """Replace the head for ``num_classes`` classes, zero-initialised (BiT fine-tuning). ``drop_pre_logits`` is
        accepted for the ViT's signature; a ResNet has no pre-logits layer."""
        weight = self.stem.conv.weight
        self.head = ClassifierHead(self.num_features, num_classes, self.cfg.dropout).to(weight.device, weight.dtype)
        self.cfg = self.cfg.replace(num_classes=num_classes)

    reset_classifier = reset_head  # timm's name

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map after the final norm: (B, C, H, W) -> (B, num_features, H / stride, W / stride)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise InvalidValueError(f"expected input of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        for stage in self.stages:
            for block in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return self.norm(x)

    @property
    def feature_info(self) -> list[dict]:
        """The stem's convolution output (stride ``stem_stride``) and each stage's output: ``module`` name,
        ``num_chs`` channels, ``reduction`` (stride), as timm's ResNetV2 lists them."""
        cfg, reduction = self.cfg, self.cfg.stem_stride
        stem = "stem.conv" if cfg.preact else "stem.norm"  # pre-activation stems have no norm of their own
        info = [{"module": stem, "num_chs": self.stem.num_features, "reduction": reduction}]
        reduction *= 2 if cfg.stem_pool else 1
        for i in range(len(self.stages)):
            reduction *= 1 if i == 0 else 2
            info.append({"module": f"stages.{i}", "num_chs": cfg.channels[i] * cfg.width_factor,
                         "reduction": reduction})
        return info

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Feature maps of the stem (before its max-pool) and of each stage, timm's interface: ``indices`` over
        those ``1 + len(layers)`` maps (None: all, n: the last n, a list: those, negative from the end); ``norm``
        applies the final norm to the last stage's map. Returns ``(final map after the norm, maps)`` or, with
        ``intermediates_only``, the maps."""
        if output_fmt != "NCHW":
            raise ModelInputError(f"output_fmt must be 'NCHW' for a ResNet, got {output_fmt!r}")
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ModelInputError(f"expected input of shape (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        taken, last = take_indices(1 + len(self.stages), indices)
        x = self.stem.norm(self.stem.conv(x))
        maps = [x] if 0 in taken else []
        x = self.stem.pool(x)
        stages = list(self.stages)[:last] if stop_early else list(self.stages)
        for i, stage in enumerate(stages, start=1):
            for block in stage.blocks:
                x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                    else block(x)
            if i in taken:
                maps.append(self.norm(x) if norm and i == len(self.stages) else x)
        return maps if intermediates_only else (self.norm(x), maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify a feature map; ``pre_logits=True`` returns the pooled (B, num_features)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
