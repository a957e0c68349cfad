"""The ResNet part of vit_jax hybrid ``.npz`` files (R50+ViT-B/16, R26+ViT-S/32, R+ViT-Ti/16, ...), plugged into the
npz reader.

vit_jax array names (prefix already stripped by :func:`~vitlab.checkpoints.npz.normalise`):

| array | shape | vitlab tensor |
|---|---|---|
| ``conv_root/kernel`` | (7, 7, C, 64w) | ``patch_embed.backbone.stem.conv.weight`` (stem only: ``backbone.conv``) |
| ``gn_root/{scale,bias}`` | (64w,) or (1, 1, 1, 64w) in old files | ``...stem.norm.{weight,bias}`` |
| ``block{s}/unit{u}/conv{1,2,3}/kernel`` | (kh, kw, in, out) | ``...stages.{s-1}.blocks.{u-1}.conv{1,2,3}.weight`` |
| ``block{s}/unit{u}/gn{1,2,3}/{scale,bias}`` | (out,) | ``...norm{1,2,3}.{weight,bias}`` |
| ``block{s}/unit1/conv_proj/kernel``, ``gn_proj`` | | ``...blocks.0.downsample.{conv,norm}`` |

Stages and units are numbered from 1 (``unit1``, not ``unit01`` as in BiT's own files). The transformer arrays are
the plain ViT's; ``embedding/kernel`` is (P, P, C', D) over the backbone's C' feature channels. Kernels are stored
raw; weight standardisation happens in the forward pass. The model read from a file computes as vit_jax does
(weights standardised by std + 1e-5, GroupNorm epsilon 1e-6, tanh GELU); timm's converted models use
sqrt(var + 1e-8), 1e-5 and exact GELU, which :func:`with_timm_numerics` switches to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import VitlabError
from ..models import HybridConfig, ResNetV2Config
from ..models.hybrid import HYBRID_BACKBONE
from .npz import NpzBackbone, NpzRule, apply_rules

# how vit_jax's hybrid backbone computes (models_resnet.py: StdConv eps 1e-5 added to the std; Flax GroupNorm 1e-6)
VIT_JAX_BACKBONE_NUMERICS = {"ws_eps": 1e-5, "ws_eps_mode": "std", "gn_eps": 1e-6}
TIMM_BACKBONE_NUMERICS = {"ws_eps": 1e-8, "ws_eps_mode": "var", "gn_eps": 1e-5}


def _conv(torch_key: str, npz_key: str) -> NpzRule:
    """Flax kernel (kh, kw, in, out) <-> torch (out, in, kh, kw)."""
    return NpzRule(torch_key, (npz_key,), lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1))),
                   lambda t: (t.detach().cpu().float().numpy().transpose(2, 3, 1, 0),))


def _group_norm(torch_prefix: str, npz_prefix: str) -> list[NpzRule]:
    """GroupNorm scale / bias; old files store them as (1, 1, 1, C), read as (C,), written as (C,)."""
    def read(a):
        return torch.from_numpy(np.ascontiguousarray(a.reshape(-1)))

    def write(t):
        return (t.detach().cpu().float().numpy(),)

    return [NpzRule(f"{torch_prefix}.weight", (f"{npz_prefix}/scale",), read, write),
            NpzRule(f"{torch_prefix}.bias", (f"{npz_prefix}/bias",), read, write)]


def stage_units(arrays: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Units per stage as the arrays hold them: ``block1/unit1..``, ``block2/unit1..``, ... (empty: stem only)."""
    layers = []
    while f"block{len(layers) + 1}/unit1/conv1/kernel" in arrays:
        stage, units = len(layers) + 1, 1
        while f"block{stage}/unit{units + 1}/conv1/kernel" in arrays:
            units += 1
        layers.append(units)
    return tuple(layers)


def backbone_rules(layers: tuple[int, ...]) -> list[NpzRule]:
    """Rules for a vit_jax hybrid backbone with ``layers`` units per stage (the first unit of each stage projects
    its shortcut, as in vit_jax whenever channels or stride change)."""
    base = "patch_embed.backbone"
    stem = f"{base}.stem" if layers else base
    rules = [_conv(f"{stem}.conv.weight", "conv_root/kernel"), *_group_norm(f"{stem}.norm", "gn_root")]
    for s, units in enumerate(layers, start=1):
        for u in range(1, units + 1):
            ours, theirs = f"{base}.stages.{s - 1}.blocks.{u - 1}", f"block{s}/unit{u}"
            for r in (1, 2, 3):
                rules.append(_conv(f"{ours}.conv{r}.weight", f"{theirs}/conv{r}/kernel"))
                rules += _group_norm(f"{ours}.norm{r}", f"{theirs}/gn{r}")
            if u == 1:
                rules.append(_conv(f"{ours}.downsample.conv.weight", f"{theirs}/conv_proj/kernel"))
                rules += _group_norm(f"{ours}.downsample.norm", f"{theirs}/gn_proj")
    return rules


def hybrid_config_from_arrays(vit_fields: dict, arrays: Mapping[str, np.ndarray]) -> HybridConfig:
    """The :class:`HybridConfig` of a hybrid file: the backbone from ``conv_root`` and the stage / unit arrays, the
    image size from the token grid times patch times the backbone's stride, vit_jax numerics."""
    root = arrays["conv_root/kernel"]
    if root.ndim != 4 or root.shape[0] != root.shape[1]:
        raise VitlabError(f"conv_root/kernel has shape {root.shape}, expected (k, k, C, 64 * width)")
    kernel, _, in_chans, stem_width = root.shape
    if stem_width % 64:
        raise VitlabError(f"conv_root/kernel has {stem_width} output channels, not a multiple of 64")
    backbone = HYBRID_BACKBONE.replace(layers=stage_units(arrays), width_factor=stem_width // 64, stem_kernel=kernel,
                                       **VIT_JAX_BACKBONE_NUMERICS)
    if vit_fields["in_chans"] != backbone.num_features:
        raise VitlabError(f"embedding/kernel reads {vit_fields['in_chans']} channels but the backbone "
                          f"(stages {backbone.layers}, width x{backbone.width_factor}) gives {backbone.num_features}")
    feature_h, feature_w = vit_fields["img_size"]
    fields = dict(vit_fields, img_size=(feature_h * backbone.stride, feature_w * backbone.stride), in_chans=in_chans)
    try:
        return HybridConfig(**fields, backbone=backbone)
    except ValueError as exc:
        raise VitlabError(f"the arrays describe no valid hybrid ({exc})") from None


def with_timm_numerics(cfg: HybridConfig) -> HybridConfig:
    """The same hybrid computed as timm computes it: weight standardisation sqrt(var + 1e-8), GroupNorm epsilon 1e-5,
    exact GELU (timm's converted hybrids)."""
    return cfg.replace(gelu="exact", backbone=cfg.backbone.replace(**TIMM_BACKBONE_NUMERICS))


VIT_JAX_HYBRID = NpzBackbone(
    name="vit_jax ResNet (hybrid)",
    architecture="hybrid",
    detect=lambda arrays: "conv_root/kernel" in arrays,
    rules=lambda arrays: backbone_rules(stage_units(arrays)),
    make_config=hybrid_config_from_arrays,
)  # vitlab.checkpoints puts it in the npz reader (register_npz_backbone)

# ------------------------------------------------------------------------------------- BiT classifiers (the baseline)
BIT_ROOT = "root_block/standardized_conv2d/kernel"


def bit_prefix(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The prefix (``resnet/`` in BiT's releases) of a BiT ResNet-v2 ``.npz``, or None when the file is not one."""
    for key in arrays:
        if key.endswith(BIT_ROOT):
            return key[: -len(BIT_ROOT)]
    return None


def bit_npz_rules(layers: tuple[int, ...], prefix: str) -> list[NpzRule]:
    """BiT's own npz names (``block{s}/unit{uu}/{a,b,c}/standardized_conv2d``, ``group_norm/{gamma,beta}``, ``a/proj``
    for the first unit, ``head/conv2d``) <-> vitlab's ResNetV2 (timm's names), pre-activation blocks."""
    def gn(ours: str, theirs: str) -> list[NpzRule]:
        read = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(-1)))  # noqa: E731
        write = lambda t: (t.detach().cpu().float().numpy(),)  # noqa: E731
        return [NpzRule(f"{ours}.weight", (f"{prefix}{theirs}/gamma",), read, write),
                NpzRule(f"{ours}.bias", (f"{prefix}{theirs}/beta",), read, write)]

    rules = [_conv("stem.conv.weight", f"{prefix}{BIT_ROOT}"), *gn("norm", "group_norm"),
             _conv("head.fc.weight", f"{prefix}head/conv2d/kernel"),
             NpzRule("head.fc.bias", (f"{prefix}head/conv2d/bias",), lambda a: torch.from_numpy(a.copy()),
                     lambda t: (t.detach().cpu().float().numpy(),))]
    for s, units in enumerate(layers, start=1):
        for u in range(1, units + 1):
            ours, theirs = f"stages.{s - 1}.blocks.{u - 1}", f"block{s}/unit{u:02d}"
            for i, letter in enumerate("abc", start=1):
                rules.append(_conv(f"{ours}.conv{i}.weight", f"{prefix}{theirs}/{letter}/standardized_conv2d/kernel"))
                rules += gn(f"{ours}.norm{i}", f"{theirs}/{letter}/group_norm")
            if u == 1:
                rules.append(_conv(f"{ours}.downsample.conv.weight",
                                   f"{prefix}{theirs}/a/proj/standardized_conv2d/kernel"))
    return rules


def read_bit_npz(arrays: Mapping[str, np.ndarray], source: str) -> tuple[ResNetV2Config, dict[str, torch.Tensor]]:
    """A BiT release (``BiT-M-R50x1.npz``, ...) as a ResNetV2 config and state dict; every array must be used."""
    prefix = bit_prefix(arrays)
    root = arrays[f"{prefix}{BIT_ROOT}"]
    if root.ndim != 4 or root.shape[-1] % 64:
        raise VitlabError(f"{source}: {prefix}{BIT_ROOT} has shape {root.shape}, expected (k, k, C, 64 * width)")
    layers = []
    while f"{prefix}block{len(layers) + 1}/unit01/a/standardized_conv2d/kernel" in arrays:
        stage, units = len(layers) + 1, 1
        while f"{prefix}block{stage}/unit{units + 1:02d}/a/standardized_conv2d/kernel" in arrays:
            units += 1
        layers.append(units)
    head = arrays.get(f"{prefix}head/conv2d/kernel")
    if head is None or not layers:
        raise VitlabError(f"{source}: a BiT root block without {'stages' if not layers else 'a head/conv2d layer'}")
    try:
        cfg = ResNetV2Config(layers=tuple(layers), width_factor=root.shape[-1] // 64, stem_kernel=root.shape[0],
                             in_chans=root.shape[2], num_classes=head.shape[-1])
    except ValueError as exc:
        raise VitlabError(f"{source}: the arrays describe no valid BiT ResNet ({exc})") from None
    return cfg, apply_rules(arrays, bit_npz_rules(cfg.layers, prefix), source)


def resnetv2_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> ResNetV2Config | None:
    """The BiT classifier a timm ``ResNetV2`` state dict (``stem.conv``, ``stages.{i}.blocks.{j}``, ``head.fc``)
    holds, from its shapes; None when the keys are not that layout."""
    if not {"stem.conv.weight", "stages.0.blocks.0.conv1.weight", "norm.weight", "head.fc.weight"} <= set(sd):
        return None
    layers = []
    while f"stages.{len(layers)}.blocks.0.conv1.weight" in sd:
        stage, blocks = len(layers), 1
        while f"stages.{stage}.blocks.{blocks}.conv1.weight" in sd:
            blocks += 1
        layers.append(blocks)
    stem = sd["stem.conv.weight"]
    try:
        return ResNetV2Config(layers=tuple(layers), width_factor=max(1, stem.shape[0] // 64),
                              stem_kernel=stem.shape[-1], in_chans=stem.shape[1],
                              num_classes=sd["head.fc.weight"].shape[0])
    except ValueError:
        return None
