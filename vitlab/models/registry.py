"""The table of named models and ``create_model``.

ViTs: the paper's Table 1 sizes plus the Ti and S sizes of the later AugReg release; patch sizes /8, /14, /16, /32.
Each size and patch has a short name (``vit_b16``) and timm-style aliases (``vit_base_patch16_224``,
``vit_base_patch16_384``) that fix the resolution. The paper's baselines and hybrids are in the same table: BiT
ResNet-v2 (``bit_r50x1`` = ``resnetv2_50x1_bit``, ...) and ResNet + ViT hybrids (``r50_vit_b16`` =
``vit_base_r50_s16_224`` / ``_384``, ...). The ViTs people start from today are rows of the same table, each the
paper's ViT with a few options of :class:`ViTConfig` (docs/families.md): DeiT (``deit_b16``, distilled
``deit_b16_distilled``), DeiT III (``deit3_b16``), DINOv2 (``dinov2_b14``, with registers ``dinov2_b14_reg4``),
DINOv3 (``dinov3_b16``: rotary position embedding, 4 registers), EVA-02 (``eva02_b14``: learned and rotary position
embeddings, SwiGLU), SigLIP / SigLIP 2 image towers (``siglip_b16``,
``siglip_so400m14``, ...) and CLIP image towers (``clip_b16``,
OpenAI's QuickGELU ``clip_b16_quickgelu``), with timm's model names as aliases. Any config field can be overridden
at creation.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import UnknownNameError
from .families import model_from_config
from .hybrid import HYBRID_BACKBONE, HybridConfig
from .resnetv2 import ResNetV2Config
from .vit import ViTConfig

ModelConfig = ViTConfig | ResNetV2Config  # HybridConfig is a ViTConfig

# size letter -> (long name, width D, depth L, MLP size M, heads)
SIZES: dict[str, tuple[str, int, int, int, int]] = {
    "ti": ("tiny", 192, 12, 768, 3),
    "s": ("small", 384, 12, 1536, 6),
    "b": ("base", 768, 12, 3072, 12),
    "l": ("large", 1024, 24, 4096, 16),
    "h": ("huge", 1280, 32, 5120, 16),
}
PATCHES = (8, 14, 16, 32)
# resolutions that get timm-style aliases: 224 for pre-training, the paper's fine-tuning resolution for the rest
ALIAS_RESOLUTIONS = {8: (224, 384), 14: (224, 518), 16: (224, 384), 32: (224, 384)}


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its canonical name, the config it builds and where it comes from."""

    name: str
    config: ModelConfig
    description: str
    aliases: tuple[str, ...] = ()


def _paper_variants() -> list[ModelEntry]:
    entries = []
    for letter, (long, dim, depth, mlp, heads) in SIZES.items():
        for patch in PATCHES:
            cfg = ViTConfig(
                img_size=224, patch_size=patch, embed_dim=dim, depth=depth, mlp_dim=mlp, num_heads=heads
            )
            aliases = tuple(f"vit_{long}_patch{patch}_{res}" for res in ALIAS_RESOLUTIONS[patch])
            entries.append(
                ModelEntry(f"vit_{letter}{patch}", cfg, f"ViT-{letter.capitalize()}/{patch}", aliases)
            )
    return entries


def _family_variants() -> list[ModelEntry]:
    """The post-2021 families (docs/families.md), as timm builds them: parameter counts equal timm's models of the
    alias names (tests/test_families.py). Headless families (DINOv2, SigLIP) have ``num_classes=0``; CLIP's
    ``head`` is its image-to-text projection (no bias in the release; timm keeps a zero bias, and so does vitlab
    so that a timm state dict loads as it is)."""
    entries = []
    deit = {"ti": "tiny", "s": "small", "b": "base"}
    for letter, long in deit.items():
        _, dim, depth, mlp, heads = SIZES[letter]
        vit = dict(img_size=224, patch_size=16, embed_dim=dim, depth=depth, mlp_dim=mlp, num_heads=heads)
        res = (224, 384) if letter == "b" else (224,)
        entries.append(ModelEntry(f"deit_{letter}16", ViTConfig(**vit), f"DeiT-{letter.capitalize()}/16",
                                  tuple(f"deit_{long}_patch16_{r}" for r in res)))
        entries.append(ModelEntry(f"deit_{letter}16_distilled", ViTConfig(**vit, distilled=True),
                                  f"DeiT-{letter.capitalize()}/16 distilled (distillation token and head)",
                                  tuple(f"deit_{long}_distilled_patch16_{r}" for r in res)))
    for letter in ("s", "b", "l"):
        long, dim, depth, mlp, heads = SIZES[letter]
        cfg = ViTConfig(img_size=224, patch_size=16, embed_dim=dim, depth=depth, mlp_dim=mlp, num_heads=heads,
                        layer_scale=1e-6, no_embed_class=True)
        entries.append(ModelEntry(f"deit3_{letter}16", cfg, f"DeiT III-{letter.capitalize()}/16 (LayerScale 1e-6, "
                                  "patch-only position embedding)",
                                  tuple(f"deit3_{long}_patch16_{r}" for r in (224, 384))))
    dinov2 = {"s": ("small", 384, 12, 1536, 6), "b": ("base", 768, 12, 3072, 12),
              "l": ("large", 1024, 24, 4096, 16), "g": ("giant", 1536, 40, 4096, 24)}
    for letter, (long, dim, depth, mlp, heads) in dinov2.items():
        # ViT-g's MLP is SwiGLU with gated width 4096 (DINOv2's round(2/3 * 4D) to a multiple of 8)
        mlp_type = "swiglu" if letter == "g" else "mlp"
        cfg = ViTConfig(img_size=518, patch_size=14, num_classes=0, embed_dim=dim, depth=depth, mlp_dim=mlp,
                        num_heads=heads, layer_scale=1e-5, mlp_type=mlp_type)
        name = f"DINOv2 ViT-{letter.capitalize()}/14"
        entries.append(ModelEntry(f"dinov2_{letter}14", cfg, f"{name} (LayerScale 1e-5, 518 px, features)",
                                  (f"vit_{long}_patch14_dinov2",)))
        entries.append(ModelEntry(f"dinov2_{letter}14_reg4", cfg.replace(reg_tokens=4, no_embed_class=True),
                                  f"{name} with 4 registers (patch-only position embedding)",
                                  (f"vit_{long}_patch14_reg4_dinov2",)))
    dinov3 = [  # name, timm stem, width, depth, heads, MLP (SwiGLU: gated width), SwiGLU, description
        ("dinov3_s16", "vit_small_patch16_dinov3", 384, 12, 6, 1536, False, "DINOv3 ViT-S/16"),
        ("dinov3_s16plus", "vit_small_plus_patch16_dinov3", 384, 12, 6, 1536, True, "DINOv3 ViT-S+/16"),
        ("dinov3_b16", "vit_base_patch16_dinov3", 768, 12, 12, 3072, False, "DINOv3 ViT-B/16"),
        ("dinov3_l16", "vit_large_patch16_dinov3", 1024, 24, 16, 4096, False, "DINOv3 ViT-L/16"),
        ("dinov3_h16plus", "vit_huge_plus_patch16_dinov3", 1280, 32, 20, 5120, True, "DINOv3 ViT-H+/16"),
        ("dinov3_7b16", "vit_7b_patch16_dinov3", 4096, 40, 32, 8192, True, "DINOv3 ViT-7B/16"),
    ]
    for name, stem, dim, depth, heads, mlp, swiglu, description in dinov3:
        # timm's settings for these models: 256 px, any input size, mean of the patch tokens after the final norm
        # (upstream reads the class token: pool='token'), no q/k/v bias (the released distilled models' are zero)
        cfg = ViTConfig(img_size=256, patch_size=16, num_classes=0, embed_dim=dim, depth=depth, num_heads=heads,
                        mlp_dim=mlp, mlp_type="swiglu" if swiglu else "mlp", pos_embed="rope", rope_rescale=2.0,
                        reg_tokens=4, layer_scale=1e-5, qkv_bias=False, norm_eps=1e-5, pool="gap",
                        dynamic_img_size=True)
        qkvb = () if name == "dinov3_7b16" else (f"{stem}_qkvb",)  # timm has no 7B with q/v biases
        entries.append(ModelEntry(name, cfg, f"{description} (2-D RoPE, 4 registers, LayerScale 1e-5, "
                                  f"{'SwiGLU, ' if swiglu else ''}features)", (stem, *qkvb)))
    eva02 = [  # name, timm size, width, depth, heads, SwiGLU gated width, sub-LN in the MLP, fine-tuning size
        ("eva02_t14", "tiny", 192, 12, 3, 512, False, 336),
        ("eva02_s14", "small", 384, 12, 6, 1024, False, 336),
        ("eva02_b14", "base", 768, 12, 12, 2048, True, 448),
        ("eva02_l14", "large", 1024, 24, 16, 2730, True, 448),
    ]
    for name, size, dim, depth, heads, mlp, sub_ln, tuned in eva02:
        # timm's eva02_* settings: the 224 px MIM pre-training size (num_classes 0; the aliases of the fine-tuning
        # size have the ImageNet-1k head), learned position table plus RoPE on positions scaled to the 16x16
        # pre-training grid, SwiGLU (gated width int(D * 8/3)), q and v biases, mean of the patch tokens + fc_norm
        cfg = ViTConfig(img_size=224, patch_size=14, num_classes=0, embed_dim=dim, depth=depth, num_heads=heads,
                        mlp_dim=mlp, mlp_type="swiglu", mlp_norm=sub_ln, rope_kind="eva", rope_base=10000.0,
                        rope_ref_grid=(16, 16), pool="gap", norm_after_pool=True)
        entries.append(ModelEntry(name, cfg, f"EVA-02 {size.capitalize()}/14 (learned + 2-D RoPE, SwiGLU"
                                  f"{' with sub-LN' if sub_ln else ''}, MIM features; {tuned} px fine-tuned alias)",
                                  (f"eva02_{size}_patch14_224", f"eva02_{size}_patch14_{tuned}")))
    siglip = [  # name, timm stem, patch, width, depth, MLP, heads, default size, alias sizes, description
        ("siglip_b16", "vit_base_patch16_siglip", 16, 768, 12, 3072, 12, 224, (224, 256, 384, 512),
         "SigLIP / SigLIP 2 B/16 image tower"),
        ("siglip_b32", "vit_base_patch32_siglip", 32, 768, 12, 3072, 12, 256, (256,), "SigLIP 2 B/32 image tower"),
        ("siglip_l16", "vit_large_patch16_siglip", 16, 1024, 24, 4096, 16, 256, (256, 384, 512),
         "SigLIP / SigLIP 2 L/16 image tower"),
        ("siglip_so400m14", "vit_so400m_patch14_siglip", 14, 1152, 27, 4304, 16, 224, (224, 378, 384),
         "SigLIP / SigLIP 2 So400m/14 image tower (384 px: 27x27 grid, the last 6 pixel rows / columns unused)"),
        ("siglip_so400m16", "vit_so400m_patch16_siglip", 16, 1152, 27, 4304, 16, 256, (256, 384, 512),
         "SigLIP 2 (and SigLIP i18n) So400m/16 image tower"),
        ("siglip_g16", "vit_giantopt_patch16_siglip", 16, 1536, 40, 6144, 16, 256, (256, 384),
         "SigLIP 2 g-opt/16 image tower"),
    ]
    for name, stem, patch, dim, depth, mlp, heads, size, sizes, description in siglip:
        cfg = ViTConfig(img_size=size, patch_size=patch, num_classes=0, embed_dim=dim, depth=depth, mlp_dim=mlp,
                        num_heads=heads, class_token=False, pool="map", gelu="tanh",
                        drop_remainder=patch == 14)
        entries.append(ModelEntry(name, cfg, f"{description} (MAP head, tanh GELU)",
                                  tuple(f"{stem}_{r}" for r in sizes)))
    clip = [  # name, size letter, patch, projection width, alias sizes
        ("clip_b32", "b", 32, 512, (224,)),
        ("clip_b16", "b", 16, 512, (224, 384)),
        ("clip_l14", "l", 14, 768, (224, 336)),
    ]
    for name, letter, patch, proj, sizes in clip:
        long, dim, depth, mlp, heads = SIZES[letter]
        cfg = ViTConfig(img_size=224, patch_size=patch, num_classes=proj, embed_dim=dim, depth=depth, mlp_dim=mlp,
                        num_heads=heads, pre_norm=True, patch_bias=False, norm_eps=1e-5)
        title = f"CLIP ViT-{letter.capitalize()}/{patch} image tower (ln_pre, projection to {proj})"
        entries.append(ModelEntry(name, cfg, title, tuple(f"vit_{long}_patch{patch}_clip_{r}" for r in sizes)))
        quick = tuple(f"vit_{long}_patch{patch}_clip_quickgelu_{r}" for r in sizes if r != 384)
        entries.append(ModelEntry(f"{name}_quickgelu", cfg.replace(gelu="quick"), f"{title}, QuickGELU (OpenAI)",
                                  quick))
    return entries


def _small_data_variants() -> list[ModelEntry]:
    """Small ViTs for small images (28x28 Fashion-MNIST, 32x32 CIFAR); not in the paper, same architecture.
    ``vit_fmnist`` is the model the ``fashion-mnist`` recipe trains (the main job; docs/training.md says why each
    size was chosen)."""
    return [
        ModelEntry(
            "vit_fmnist",
            ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=3,
                      mlp_dim=192, pool="gap", class_token=False, pos_embed="sincos"),
            "the main job's ViT for 28x28 grey images (4x4 patches, 7x7 grid, width 96, depth 4, sin-cos, gap)",
        ),
        ModelEntry(
            "vit_cifar",
            ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_dim=384),
            "small-data ViT for 32x32 colour images (4x4 patches, 8x8 grid)",
        ),
    ]


def _bit_variants() -> list[ModelEntry]:
    """BiT ResNet-v2 classifiers (Kolesnikov et al. 2020), the paper's convolutional baselines (Table 2's BiT-L is
    R152x4). Depths 50 / 101 / 152, width factors 1 to 4."""
    depths = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
    entries = []
    for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)):
        cfg = ResNetV2Config(layers=depths[depth], width_factor=width)
        entries.append(ModelEntry(f"bit_r{depth}x{width}", cfg, f"BiT ResNet-v2 {depth}x{width}",
                                  (f"resnetv2_{depth}x{width}_bit",)))
    return entries


def _hybrid_variants() -> list[ModelEntry]:
    """ResNet + ViT hybrids of the paper (R50+ViT-B/16, R50+ViT-L/32) and of the AugReg release (R26+ViT-S/32,
    R+ViT-Ti/16 with the stem alone and 8x8 patches)."""
    table = [  # name, size letter, backbone stages, patch on the feature map, timm alias stem, description
        ("r50_vit_b16", "b", (3, 4, 9), 1, "vit_base_r50_s16", "R50+ViT-B/16 (stages 3, 4, 9; stride 16)"),
        ("r50_vit_l32", "l", (3, 4, 6, 3), 1, "vit_large_r50_s32", "R50+ViT-L/32 (stride 32)"),
        ("r26_vit_s32", "s", (2, 2, 2, 2), 1, "vit_small_r26_s32", "R26+ViT-S/32 (stride 32)"),
        ("r26_vit_b32", "b", (2, 2, 2, 2), 1, "vit_base_r26_s32", "R26+ViT-B/32 (stride 32)"),
        ("r_vit_ti16", "ti", (), 8, "vit_tiny_r_s16_p8", "R+ViT-Ti/16 (stem only, 8x8 patches)"),
    ]
    entries = []
    for name, letter, stages, patch, alias, description in table:
        _, dim, depth, mlp, heads = SIZES[letter]
        cfg = HybridConfig(img_size=224, patch_size=patch, embed_dim=dim, depth=depth, mlp_dim=mlp, num_heads=heads,
                           backbone=HYBRID_BACKBONE.replace(layers=stages))
        resolutions = (224,) if name == "r26_vit_b32" else (224, 384)
        entries.append(ModelEntry(name, cfg, description, tuple(f"{alias}_{res}" for res in resolutions)))
    return entries


def _small_data_baselines() -> list[ModelEntry]:
    """A BiT ResNet and a hybrid for 28x28 grey images (not in the paper), the baselines of the experiments
    (docs/experiments.md). Small images get a 3x3/1 stem without max-pool, and GroupNorm(8) because the narrowest
    layers have 16 channels. The hybrid's transformer is width 128, depth 6, 4 heads, MLP 256, class token and
    learned position embedding, on a 7x7 grid of 2x2 patches of the 14x14 feature map."""
    small = dict(stem_width=32, stem_kernel=3, stem_stride=1, stem_pool=False, gn_groups=8)
    return [
        ModelEntry(
            "bit_fmnist",
            ResNetV2Config(layers=(2, 2, 2), channels=(64, 128, 256), img_size=28, in_chans=1, num_classes=10,
                           **small),
            "small-data BiT ResNet-v2 for 28x28 grey images (3 stages of 2 blocks, 256 features at 7x7)",
        ),
        ModelEntry(
            "r_vit_fmnist",
            HybridConfig(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4,
                         mlp_dim=256, backbone=HYBRID_BACKBONE.replace(layers=(1, 1), channels=(64, 128), **small)),
            "small-data hybrid: 2-stage ResNet (128 channels at 14x14), 2x2 patches, ViT width 128, depth 6",
        ),
    ]


_ENTRIES: dict[str, ModelEntry] = {}
_ALIASES: dict[str, tuple[str, dict]] = {}


def register(entry: ModelEntry) -> None:
    """Add a named model to the table (the built-in entries are added below; users may add their own)."""
    if entry.name in _ENTRIES or entry.name in _ALIASES:
        raise ValueError(f"model name {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    for alias in entry.aliases:
        res = alias.rsplit("_", 1)[-1]
        overrides = {"img_size": int(res)} if res.isdigit() else {}
        _ALIASES[alias] = (entry.name, overrides)


for _family in (_paper_variants, _small_data_variants, _bit_variants, _hybrid_variants, _small_data_baselines,
                _family_variants):
    for _entry in _family():
        register(_entry)
# timm's DINOv3 ``_qkvb`` models keep the query and value biases of the release (zero in the distilled models):
# their aliases build the entries with qkv_bias=True (vitlab stores the masked key third too, held out of the sum)
# timm's EVA-02 models at their fine-tuning sizes (336, 448) carry the ImageNet-1k classifier, at 224 none (MIM)
for _alias, (_name, _overrides) in list(_ALIASES.items()):
    if _alias.endswith("_dinov3_qkvb"):
        _ALIASES[_alias] = (_name, {"qkv_bias": True})
    elif _alias.startswith("eva02_") and _overrides.get("img_size") != 224:
        _ALIASES[_alias] = (_name, {**_overrides, "num_classes": 1000})


def list_models(pattern: str | None = None, aliases: bool = False) -> list[str]:
    """Registered model names, optionally filtered by a substring or ``fnmatch`` pattern (matched against names and
    their timm-style aliases); with ``aliases`` the aliases are listed too."""
    glob = None
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    names = []
    for entry in _ENTRIES.values():
        candidates = [entry.name, *entry.aliases]
        if glob is None or any(fnmatch.fnmatch(n, glob) for n in candidates):
            names.append(entry.name)
            if aliases:
                names.extend(a for a in entry.aliases if glob is None or fnmatch.fnmatch(a, glob))
    return names


def resolve(name: str) -> tuple[ModelEntry, dict]:
    """The entry behind a name or alias, and the overrides the alias implies."""
    if name in _ENTRIES:
        return _ENTRIES[name], {}
    if name in _ALIASES:
        base, overrides = _ALIASES[name]
        return _ENTRIES[base], dict(overrides)

    close = difflib.get_close_matches(name, list(_ENTRIES) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitlab models`"
    raise UnknownNameError(f"unknown model {name!r}{hint}")


def get_config(name: str, **overrides) -> ModelConfig:
    """The config a name builds, with overrides applied (e.g. ``img_size=384, num_classes=10``)."""
    entry, implied = resolve(name)
    return entry.config.replace(**{**implied, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model, freshly initialised. Overrides are fields of its config (:class:`ViTConfig`,
    :class:`HybridConfig` or :class:`ResNetV2Config`).

    >>> model = create_model("vit_b16", num_classes=10, img_size=384)
    >>> bit = create_model("bit_r50x1", num_classes=10)
    """
    return model_from_config(get_config(name, **overrides))

