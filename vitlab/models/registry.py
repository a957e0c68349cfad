"""The table of named ViT variants and ``create_model``.

Sizes are the paper's Table 1 plus the Ti and S sizes of the later AugReg release; patch sizes /8, /14, /16, /32.
Each size and patch has a short name (``vit_b16``) and timm-style aliases (``vit_base_patch16_224``,
``vit_base_patch16_384``) that fix the resolution. Any config field can be overridden at creation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .vit import VisionTransformer, ViTConfig

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
    config: ViTConfig
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


def _small_data_variants() -> list[ModelEntry]:
    """Small ViTs for small images (28x28 Fashion-MNIST, 32x32 CIFAR); not in the paper, same architecture."""
    return [
        ModelEntry(
            "vit_fmnist",
            ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4,
                      mlp_dim=256),
            "small-data ViT for 28x28 grey images (4x4 patches, 7x7 grid)",
        ),
        ModelEntry(
            "vit_cifar",
            ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_dim=384),
            "small-data ViT for 32x32 colour images (4x4 patches, 8x8 grid)",
        ),
    ]


_ENTRIES: dict[str, ModelEntry] = {}
_ALIASES: dict[str, tuple[str, dict]] = {}


def register(entry: ModelEntry) -> None:
    """Add a model to the table (other model families register themselves the same way)."""
    if entry.name in _ENTRIES or entry.name in _ALIASES:
        raise ValueError(f"model name {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    for alias in entry.aliases:
        res = alias.rsplit("_", 1)[-1]
        overrides = {"img_size": int(res)} if res.isdigit() else {}
        _ALIASES[alias] = (entry.name, overrides)


for _entry in _paper_variants() + _small_data_variants():
    register(_entry)


def list_models(pattern: str | None = None, aliases: bool = False) -> list[str]:
    """Registered model names, optionally filtered by a substring or ``fnmatch`` pattern (matched against names and
    their timm-style aliases); with ``aliases`` the aliases are listed too."""
    import fnmatch

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
    import difflib

    close = difflib.get_close_matches(name, list(_ENTRIES) + list(_ALIASES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitlab models`"
    raise KeyError(f"unknown model {name!r}{hint}")


def get_config(name: str, **overrides) -> ViTConfig:
    """The config a name builds, with overrides applied (e.g. ``img_size=384, num_classes=10``)."""
    entry, implied = resolve(name)
    return entry.config.replace(**{**implied, **overrides})


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a registered model, freshly initialised. Overrides are :class:`ViTConfig` fields.

    >>> model = create_model("vit_b16", num_classes=10, img_size=384)
    """
    return VisionTransformer(get_config(name, **overrides))
