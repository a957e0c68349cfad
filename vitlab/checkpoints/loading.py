"""Read any supported checkpoint into one record, then build a model from it (new resolution, new head).

:func:`read_checkpoint` sniffs the file, reads it safely, maps its names onto vitlab's and works out the
architecture, the preprocessing of its source and notable facts. :func:`model_from_checkpoint` turns that record into a
:class:`~vitlab.models.VisionTransformer`, resampling the position embedding and replacing the head when asked, and
loads the weights strictly: any missing, unexpected or mis-shaped key is an error that lists them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import VitlabError
from ..labels import class_names as label_names
from ..models import FAMILIES, ModelConfig, ModelFamily, ViTConfig, get_config, has_tokens, resolve
from ..models.lora import add_lora, merge_lora
from ..models.pretrained import LABEL_SETS
from ..preprocessing import Preprocessing
from . import npz as npz_layout
from .adapter import ADAPTER_KEY, base_candidates, check_base_hash, load_adapter_tensors, read_adapter_document
from .channels import adapt_model_channels, adapt_preprocessing_channels, adapt_state_dict_channels
from .dinov3_layout import DINOV3_LAYOUTS, default_grid, dinov3_heads
from .eva02_layout import EVA02_LAYOUTS
from .family_layouts import (
    FAMILY_NUMERICS,
    HF_FAMILY_TYPES,
    detect_family_layout,
    hf_hints,
    hf_vision_config,
    to_timm_names,
)
from .files import read_json_object, read_npz, read_safetensors, read_torch, sniff
from .hybrid_npz import bit_prefix, read_bit_npz, resnetv2_config_from_state_dict
from .resample import check_method, resample_1d, resample_patch_embed, resample_pos_embed
from .statedicts import detect_layout, infer_config, no_ema_message, to_vitlab_names, unwrap_state_dict
from .vitlab_format import parse_document, read_document

FORMATS = ("vitlab", "vit_jax", "big_vision", "bit", "timm", "hf", "torchvision", "dinov2", "deit3", "open_clip",
           "dinov3", "timm_dinov3", "eva02", "timm_eva02")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the ViTConfig fields that the weights cannot show, as each source's code sets them
SOURCE_NUMERICS = {
    "vit_jax": {"gelu": "tanh", "norm_eps": 1e-6},  # Flax nn.gelu is the tanh approximation
    "big_vision": {"gelu": "tanh", "norm_eps": 1e-6},
    "timm": {"gelu": "exact", "norm_eps": 1e-6},
    "hf": {"gelu": "exact", "norm_eps": 1e-12},  # transformers' ViTConfig default
    "torchvision": {"gelu": "exact", "norm_eps": 1e-6},
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the original releases' evaluation: (mean, std, crop_pct), bicubic. DINOv2 and DeiT (III): ImageNet statistics, the
# shorter side to 256 / 224 of the size, centre crop; OpenAI CLIP: its own statistics, shorter side to the size;
# DINOv3 (timm's default_cfg): ImageNet statistics, crop 1.0 at 256 px. EVA-02 (timm's default_cfg): OpenAI CLIP
# statistics, crop 0.9 at 224 px and 1.0 at the fine-tuning sizes (336, 448).
PUBLISHER_EVAL = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD, 0.875), "deit3": (IMAGENET_MEAN, IMAGENET_STD, 0.875),
                  "open_clip": (CLIP_MEAN, CLIP_STD, 1.0), "dinov3": (IMAGENET_MEAN, IMAGENET_STD, 1.0)}
_ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")


class CheckpointWarning(UserWarning):
    """Something about a checkpoint the user should know before trusting its outputs (e.g. a zeroed head)."""


@dataclass
class Checkpoint:
    """A checkpoint read into vitlab's terms. ``state_dict`` uses vitlab names; ``config`` is the architecture the
    weights fit as stored (before any resolution or head change)."""

    path: str
    format: str
    container: str
    state_dict: dict[str, torch.Tensor]
    config: ModelConfig  # a ViTConfig (HybridConfig) or a ResNetV2Config, as ``architecture`` says
    architecture: ModelFamily
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def default_resample(self) -> str:
        """vit_jax's bilinear aligned-corners rule for npz files, timm's antialiased bicubic for the rest."""
        return "bilinear_aligned" if self.format in ("vit_jax", "big_vision") else "bicubic"


# ------------------------------------------------------------------------------------------------- preprocessing
def source_preprocessing(fmt: str, img_size: tuple[int, int], in_chans: int) -> Preprocessing:
    """The evaluation preprocessing each source documents for its ViTs (used when a file carries none).

    vit_jax / big_vision: squash to the model size, bilinear, [-1, 1]. timm: shorter side to size / 0.9 (1.0 from 384
    up), centre crop, bicubic, mean = std = 0.5. Hugging Face: squash, bilinear, mean = std = 0.5. torchvision:
    shorter side to size * 256/224, centre crop, bilinear, ImageNet mean and std."""
    half = (0.5,) * in_chans
    if fmt in EVA02_LAYOUTS and in_chans == 3:
        crop = 1.0 if min(img_size) >= 336 else 0.9
        return Preprocessing(img_size, resize="crop", crop_pct=crop, interpolation="bicubic", mean=CLIP_MEAN,
                             std=CLIP_STD)
    if fmt in PUBLISHER_EVAL and in_chans == 3:
        mean, std, crop = PUBLISHER_EVAL[fmt]
        return Preprocessing(img_size, resize="crop", crop_pct=crop, interpolation="bicubic", mean=mean, std=std)
    if fmt == "timm":
        crop = 1.0 if min(img_size) >= 384 else 0.9
        return Preprocessing(img_size, resize="crop", crop_pct=crop, interpolation="bicubic", mean=half, std=half,
                             channels=in_chans)
    if fmt == "torchvision" and in_chans == 3:
        return Preprocessing(img_size, resize="crop", crop_pct=224 / 256, interpolation="bilinear",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Preprocessing.for_model(img_size, in_chans)


# ------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, *, model_name: str | None = None, prefer_ema: bool = False,
                    grid_hint: tuple[int, int] | None = None, check_finite: bool = True,
                    source=None, base: tuple[Path, Checkpoint] | None = None) -> Checkpoint:
    """Read any supported checkpoint file (format sniffed from its bytes) into a :class:`Checkpoint`.

    ``model_name`` supplies what a layout does not store (the head count of fused-qkv layouts, a non-square grid) and
    is checked against the weights. ``prefer_ema`` picks EMA weights from a training checkpoint that has both.
    ``source`` is what :func:`vitlab.hub.resolve` made of a name (a :class:`vitlab.hub.Resolved`; then ``path`` is
    ignored): its file is read and what the source says is applied. :func:`vitlab.read_checkpoint` takes names too.
    A LoRA adapter file is read as its base with the adapter merged; ``base`` is its base as (path, record) when
    the caller found it (by name), else it is looked for among local files (:mod:`vitlab.checkpoints.adapter`).
    Raises :class:`VitlabError` for unreadable, unsafe or non-finite files."""
    resolved = source
    overrides = {}
    if resolved is not None:  # a catalog name, hf-hub: repo or URL, now a local file
        if model_name is None:  # the source's model, with the fields it changes (timm's model_args)
            model_name, overrides = resolved.model_name, dict(getattr(resolved, "config_overrides", {}))
        grid_hint = grid_hint or resolved.grid_hint
        path = resolved.path
    path = Path(path)
    source = str(path)
    kind = sniff(path)
    if prefer_ema and kind not in ("torch-zip", "torch-legacy"):  # only torch.save files hold a training state
        raise VitlabError(no_ema_message(source))
    named = None
    if model_name is not None:
        named = get_config(model_name, **overrides)
        grid_hint = grid_hint or (named.grid_size if has_tokens(named) else None)  # CNN baselines have no token grid
    if kind == "npz":
        ckpt = _read_npz(path, grid_hint)
    elif kind == "directory":
        ckpt = _read_hf_folder(path, grid_hint, named)
    elif kind == "safetensors":
        tensors, metadata = read_safetensors(path)
        adapter = read_adapter_document(metadata, source)
        document = read_document(metadata, source) if adapter is None else None
        if adapter is not None:  # a LoRA adapter: its base with the adapter merged
            ckpt = _from_adapter(source, tensors, adapter, base)
        elif document is not None:
            ckpt = _from_vitlab_document(source, tensors, document)
        else:
            ckpt = _from_state_dict(source, "safetensors", tensors, [], grid_hint, named)
            if metadata and set(metadata) != {"format"}:
                ckpt.metadata = dict(metadata)
    else:  # torch-zip or torch-legacy
        obj = read_torch(path)
        state_dict, notes = unwrap_state_dict(obj, source, prefer_ema=prefer_ema)
        ckpt = _from_state_dict(source, "torch", state_dict, notes, grid_hint, named, container_obj=obj)
    if named is not None:
        _check_named(ckpt, named, model_name)
    _source_size_with_remainder(ckpt, resolved)
    check_plausible_size(ckpt.config, ckpt.state_dict, source)
    with torch.device("meta"):  # the architecture's expected shapes, without allocating it
        expected = construct_uninitialised(ckpt.architecture.model_class, ckpt.config).state_dict()
    check_fit(expected, ckpt.state_dict, source)
    if check_finite:
        _check_finite(ckpt)
    if resolved is not None:
        _apply_source(ckpt, resolved)
    _imagenet_names(ckpt)
    _record_facts(ckpt)
    return ckpt


# a file's config is data like its tensors: one that asks for more than any real model is refused before building
MAX_IMAGE_SIDE = 16384  # pixels; the largest published ViT fine-tuning resolutions are around 1,000
TOKEN_VALUES_FLOOR = 2**24  # tokens x width any model may have, whatever its size


def check_plausible_size(config, state_dict: dict, source: str) -> None:
    """Refuse a config whose input no real model takes (every image would be resized to it), or whose token grid
    holds far more values than the file has weights: building the model would compute a fixed (sin-cos) embedding
    of that size, and every image's activations would be that large. Runs before anything is built."""
    _check_size_fields(config, state_dict, source)
    img = getattr(config, "img_size", None)
    if img is None:
        return
    if max(img) > MAX_IMAGE_SIDE:
        raise VitlabError(f"{source}: config field img_size {img[0]}x{img[1]} is beyond any real model (at most "
                          f"{MAX_IMAGE_SIDE:,} px a side); the file is corrupt or not what it claims")
    tokens, width = getattr(config, "num_patches", None), getattr(config, "embed_dim", None)
    if not tokens or not width:
        return
    held = sum(t.numel() for t in state_dict.values())
    if tokens * width > max(4 * held, TOKEN_VALUES_FLOOR):
        raise VitlabError(f"{source}: config field img_size {img[0]}x{img[1]} (patch {config.patch_size[0]}) asks "
                          f"for {tokens:,} tokens of width {width} ({tokens * width:,} values per image, "
                          f"{4 * tokens * width / 1e9:.1f} GB) from weights of {held:,} values; the file is corrupt "
                          "or not what it claims")


_COUNT_FIELDS = ("depth", "layers")  # how many blocks: each holds several tensors of its own


def _check_size_fields(config, state_dict: dict, source: str) -> None:
    """Every size field of a stored config (the backbone's too) checked against the tensors the file holds, before
    anything is built or iterated: a block count cannot exceed the number of tensors, a width or count cannot exceed
    the values held, and the matrices the widths imply (D x D attention, D x M MLP, classes x D head) must fit in
    them. A file whose metadata says 10,000,000 blocks next to the weights of 4 is refused here, not after minutes
    of building."""
    held = sum(t.numel() for t in state_dict.values())
    bound = max(4 * held, TOKEN_VALUES_FLOOR)

    def fields_of(cfg, prefix: str = ""):
        for name, value in vars(cfg).items():
            if hasattr(value, "__dataclass_fields__"):
                yield from fields_of(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", name, value

    for label, name, value in fields_of(config):
        numbers = [value] if type(value) is int else \
            [v for v in value if type(v) is int] if isinstance(value, (tuple, list)) else []
        if name == "img_size" or not numbers:
            continue  # the image size has its own check below (a fixed embedding can make it cost no tensors)
        if name in _COUNT_FIELDS and sum(numbers) > max(len(state_dict), 1):
            raise VitlabError(f"{source}: config field {label} {value} asks for more blocks than the file's "
                              f"{len(state_dict):,} tensors can hold; the file is corrupt or not what it claims")
        if max(numbers) > bound or min(numbers) < 0:
            raise VitlabError(f"{source}: config field {label} {value} does not fit the file's {held:,} weight "
                              "values; the file is corrupt or not what it claims")
    width, mlp = getattr(config, "embed_dim", None), getattr(config, "mlp_dim", None)
    classes = getattr(config, "num_classes", None)
    for what, size in (("embed_dim x embed_dim", (width or 0) ** 2), ("embed_dim x mlp_dim", (width or 0) * (mlp or 0)),
                       ("num_classes x embed_dim", (classes or 0) * (width or 0))):
        if type(size) is int and size > bound:
            raise VitlabError(f"{source}: config fields {what} ask for weight matrices of {size:,} values from a file "
                              f"of {held:,}; the file is corrupt or not what it claims")


def _imagenet_names(ckpt: Checkpoint) -> None:
    """A published layout (npz, timm, HF, torchvision) with a 1,000- or 21,843-class head and no names of its own is
    an ImageNet-1k / ImageNet-21k classifier (the only such releases): give it those names, and say so."""
    if ckpt.class_names is not None or ckpt.format == "vitlab":
        return
    label_set = {1000: "imagenet-1k", 21843: "imagenet-21k"}.get(getattr(ckpt.config, "num_classes", 0))
    if label_set is not None:
        ckpt.class_names = label_names(label_set)
        ckpt.notes.append(f"class names: {label_set} (assumed from the {ckpt.config.num_classes}-class head)")


def _apply_source(ckpt: Checkpoint, resolved) -> None:
    """Give a checkpoint fetched by name what its source says (preprocessing, class names) and check a catalog
    entry's resolution and classes against the file."""
    cfg, entry = ckpt.config, resolved.entry
    if entry is not None:
        source = next((s for s in entry.sources if s.spec == resolved.source), None)
        problems = []
        if not has_tokens(cfg):  # a CNN takes any size: the entry's resolution is its nominal one
            ckpt.config = cfg = cfg.replace(img_size=entry.img_size)
        elif tuple(cfg.img_size) != (entry.img_size, entry.img_size):
            problems.append(f"resolution {tuple(cfg.img_size)} (catalog: {entry.img_size})")
        if cfg.num_classes != entry.num_classes and not (source and source.note):
            problems.append(f"{cfg.num_classes} classes (catalog: {entry.num_classes})")
        if problems:
            raise VitlabError(f"{resolved.spec}: the file {ckpt.path} does not match the catalog entry: "
                              + ", ".join(problems))
    if resolved.preprocessing is not None and ckpt.format != "vitlab":
        ckpt.preprocessing = resolved.preprocessing.replace(img_size=cfg.img_size)
    if ckpt.class_names is None:
        if resolved.class_names is not None and len(resolved.class_names) == cfg.num_classes:
            ckpt.class_names = list(resolved.class_names)
        elif resolved.label_set and LABEL_SETS.get(resolved.label_set) == cfg.num_classes:
            ckpt.class_names = label_names(resolved.label_set)
    ckpt.facts.update(resolved.facts, resolved_from=resolved.spec)


def _from_vitlab_document(source: str, tensors: dict, document: dict) -> Checkpoint:
    arch, config, preprocessing, class_names, metadata = parse_document(document, source)
    return Checkpoint(source, "vitlab", "safetensors", tensors, config, arch, preprocessing, class_names, metadata,
                      facts={"format_version": document.get("format_version")})


def _local_base(document: dict, source: str) -> tuple[Path, Checkpoint]:
    """(path, record) of an adapter's base among local files: the recorded name when it is a path, the recorded
    absolute path, a file of that name beside the adapter. Names (catalog, ``hf-hub:``) are resolved one layer up,
    by :func:`vitlab.read_checkpoint` / :func:`vitlab.load`, which pass the base they found."""
    for spec in base_candidates(document, source):
        if Path(spec).exists():
            check_base_hash(document, source, spec)  # before reading what may be the wrong file
            return Path(spec), read_checkpoint(spec)
    raise VitlabError(f"{source}: cannot find the adapter's base checkpoint {document['base']['name']} (tried "
                      f"{', '.join(base_candidates(document, source))}); read it with vitlab.load, which resolves "
                      "catalog and hf-hub: names, or pass where the base is (base=... / --base)")


def adapted_model(source: str, tensors: dict, document: dict, base_path: str | os.PathLike,
                  base_ckpt: Checkpoint) -> nn.Module:
    """The model an adapter file describes, adapters not merged, from its base (``base_path``, read as
    ``base_ckpt``): the base's hash checked, the base loaded as the run loaded it (resolution, head, channels), the
    adapters added and filled from the file."""
    check_base_hash(document, source, base_path)
    arch, config, preprocessing, class_names, _ = parse_document(document, source)
    drop = bool(getattr(base_ckpt.config, "representation_size", None)) and not getattr(config,
                                                                                       "representation_size", None)
    model = model_from_checkpoint(base_ckpt, img_size=config.img_size, num_classes=config.num_classes,
                                  drop_pre_logits=drop)
    if model.cfg.in_chans != config.in_chans:  # as the run adapted it (vitlab.train.transfer.adapt_init_channels)
        model = adapt_model_channels(model, config.in_chans)
    if model.cfg != config:  # options without weights (dropout, ...) the run changed
        state = model.state_dict()
        model = construct_uninitialised(arch.model_class, config)
        load_strict(model, state, source)
    with torch.random.fork_rng(devices=[]):  # the adapters' random start is overwritten: leave the caller's RNG be
        add_lora(model, document["lora"])
    load_adapter_tensors(model, tensors, source)
    model.preprocessing, model.class_names = preprocessing, class_names
    return model.eval()


def _from_adapter(source: str, tensors: dict, document: dict, base: tuple[Path, Checkpoint] | None) -> Checkpoint:
    settings = document["lora"]
    base_path, base_ckpt = base if base is not None else _local_base(document, source)
    model = merge_lora(adapted_model(source, tensors, document, base_path, base_ckpt))
    arch, config, preprocessing, class_names, metadata = parse_document(document, source)
    record = document["base"]
    method = "DoRA" if settings.dora else "LoRA"
    note = (f"{method} adapter (rank {settings.rank}, alpha {settings.scale * settings.rank:g}, "
            f"on {','.join(settings.targets)}) merged into its base {record['name']} (sha256 "
            f"{record['sha256'][:12]}... checked)")
    return Checkpoint(source, "vitlab", "lora-adapter", model.state_dict(), config, arch, preprocessing, class_names,
                      metadata, notes=[note], facts={"adapter": {"method": document["method"], **settings.to_dict(),
                                                                 "base": dict(record),
                                                                 "adapter_tensors": len(tensors)}})


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, document) of an adapter file; anything else is refused in one line."""
    source = str(path)
    if sniff(path) != "safetensors":
        raise VitlabError(f"{source}: not an adapter file (adapters are .safetensors files)")
    tensors, metadata = read_safetensors(path)
    document = read_adapter_document(metadata, source)
    if document is None:
        raise VitlabError(f"{source}: not an adapter file (no '{ADAPTER_KEY}' metadata); load it with vitlab.load")
    return tensors, document


def _embedded_config(obj: object) -> tuple[ViTConfig | None, list[str] | None]:
    """A training checkpoint may carry ``config`` (ViTConfig fields) and ``class_names`` next to the weights."""
    if not isinstance(obj, dict):
        return None, None
    config = None
    for key in ("vit_config", "model_config", "config"):
        value = obj.get(key)
        if isinstance(value, dict):
            try:
                config = ViTConfig.from_dict(value)
                break
            except (TypeError, ValueError):
                continue
    names = obj.get("class_names")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
    return config, names


def _embedded_preprocessing(obj: object, source: str, config) -> Preprocessing | None:
    """The preprocessing a vitlab training checkpoint (a run's ``.pt``) stores next to the weights: what the run
    trained and evaluated with, not a guess from the tensor names."""
    value = obj.get("preprocessing") if isinstance(obj, dict) else None
    if not isinstance(value, dict):
        return None
    try:
        pre = Preprocessing.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"{source}: the stored preprocessing is invalid: {exc}") from None
    if pre.channels != config.in_chans:
        raise VitlabError(f"{source}: the stored preprocessing is for {pre.channels}-channel images, the weights take "
                          f"{config.in_chans}")
    return pre.replace(img_size=config.img_size)


def _from_state_dict(source: str, container: str, state_dict: dict, notes: list[str],
                     grid_hint: tuple[int, int] | None, named: ModelConfig | None,
                     container_obj: object = None, hf_config: dict | None = None) -> Checkpoint:
    family = detect_family_layout(state_dict)
    heads = dinov3_heads(state_dict) if family in DINOV3_LAYOUTS else None
    if family is not None:  # DINOv2, DeiT, SigLIP, CLIP, DINOv3 layouts: to timm names first
        state_dict, family_notes = to_timm_names(state_dict, family, source)
        notes = notes + family_notes
    if family in DINOV3_LAYOUTS and grid_hint is None:  # no position table: timm's default size, any size runs
        grid_hint = default_grid(state_dict)
    layout = detect_layout(state_dict)
    bit = resnetv2_config_from_state_dict(state_dict) if layout is None else None
    if bit is not None:  # timm's ResNetV2 (BiT) names are vitlab's
        pre = source_preprocessing("timm", bit.img_size, bit.in_chans)
        return Checkpoint(source, "timm", container, dict(state_dict), bit, FAMILIES["resnetv2"], pre,
                          notes=notes + ["timm ResNetV2 (BiT) state dict"])
    if layout is None:
        sample = ", ".join(sorted(state_dict)[:5])
        raise VitlabError(f"{source}: tensors in no known ViT layout (timm, Hugging Face, torchvision); first keys: "
                          f"{sample}")
    sd, more_notes = to_vitlab_names(state_dict, layout)
    notes = notes + more_notes
    embedded, class_names = _embedded_config(container_obj)
    defaults = dict(FAMILY_NUMERICS.get(family) or SOURCE_NUMERICS[layout])
    if heads is not None:
        defaults["num_heads"] = heads
    if hf_config:
        defaults.update(hf_config)
    elif named is not None:
        defaults["num_heads"] = named.num_heads
        if getattr(named, "rotary", False):  # nothing in the weights shows the rotary embedding
            defaults.update({f: getattr(named, f) for f in ("pos_embed", "rope_base", "rope_shift", "rope_jitter",
                                                            "rope_rescale", "rope_kind", "rope_ref_grid",
                                                            "dynamic_img_size")})
        # what the named model's family fixes and the weights cannot show (SigLIP's tanh GELU, CLIP's eps 1e-5 and
        # QuickGELU, the So400m/14 grid at 384 px)
        defaults.update({f: getattr(named, f) for f in ("gelu", "norm_eps", "layer_scale", "drop_remainder")
                         if hasattr(named, f)})
        if getattr(named, "pool", None) == "gap" and not named.norm_after_pool and "fc_norm.weight" not in sd \
                and "attn_pool.latent" not in sd:  # averaging after the final norm: the weights cannot show it
            defaults.update(pool="gap", norm_after_pool=False)
    if embedded is not None:
        config = embedded
        notes.append("architecture taken from the config stored in the checkpoint")
    else:
        config, inferred_notes = infer_config(sd, source, defaults=defaults, grid_hint=grid_hint)
        if named is None and not hf_config:
            notes += inferred_notes
    fmt = layout if family is None or family.startswith("hf_") else family
    stored = _embedded_preprocessing(container_obj, source, config)
    preprocessing = stored or source_preprocessing("dinov3" if family in DINOV3_LAYOUTS else fmt, config.img_size,
                                                   config.in_chans)
    if class_names is not None and len(class_names) != config.num_classes:
        class_names = None
    ckpt = Checkpoint(source, fmt, container, sd, config, FAMILIES["vit"], preprocessing, class_names, notes=notes)
    if stored is not None:  # a vitlab run's .pt: `vitlab info` says the preprocessing is the file's own
        ckpt.facts["stored_preprocessing"] = True
    if family is not None:
        ckpt.facts["family_layout"] = family
    return ckpt


def _read_npz(path: Path, grid_hint: tuple[int, int] | None) -> Checkpoint:
    source = str(path)
    raw = read_npz(path)
    if bit_prefix(raw) is not None:  # a BiT ResNet-v2 release (the paper's convolutional baseline)
        cfg, state_dict = read_bit_npz(raw, source)
        pre = source_preprocessing("vit_jax", cfg.img_size, cfg.in_chans)  # BiT evaluates the same way
        ckpt = Checkpoint(source, "bit", "npz", state_dict, cfg, FAMILIES["resnetv2"], pre,
                          notes=["BiT ResNet-v2 release (pre-activation, weight-standardised convolutions)"])
        ckpt.facts.update(arrays=len(raw))
        return ckpt
    arrays, layout = npz_layout.normalise(raw, source)
    fields, notes = npz_layout.infer_vit_fields(arrays, layout, source, grid_hint)
    try:
        vit_cfg = ViTConfig(**fields)  # the transformer part as the arrays describe it
    except ValueError as exc:
        raise VitlabError(f"{source}: the arrays describe no valid ViT ({exc})") from None
    backbone = npz_layout.find_backbone(arrays)
    if backbone is not None:
        if backbone.architecture not in FAMILIES:
            raise VitlabError(f"{source}: the {backbone.name} backbone builds architecture "
                              f"{backbone.architecture!r}, which is not registered")
        config = backbone.make_config(fields, arrays)
        arch = FAMILIES[backbone.architecture]
        extra_rules = backbone.rules(arrays)
        notes.append(f"convolutional backbone: {backbone.name}")
    else:
        config, arch, extra_rules = vit_cfg, FAMILIES["vit"], []
    state_dict = npz_layout.apply_rules(arrays, extra_rules + npz_layout.vit_rules(vit_cfg), source)
    # a big_vision 'tok' embedding has no class slot: a zero row there adds nothing to the class token
    if config.class_token and not layout.pos_has_class_slot and "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        state_dict["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    fmt = layout.flavour
    preprocessing = source_preprocessing(fmt, config.img_size, config.in_chans)
    ckpt = Checkpoint(source, fmt, "npz", state_dict, config, arch, preprocessing, notes=layout.notes + notes)
    ckpt.facts.update(npz_prefix=layout.prefix or None, scanned=layout.scanned, bfloat16=bool(layout.bfloat16),
                      arrays=len(arrays))
    return ckpt


def _read_hf_folder(path: Path, grid_hint: tuple[int, int] | None, named: ModelConfig | None) -> Checkpoint:
    source = str(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise VitlabError(f"{source}: a directory without config.json; expected a Hugging Face model folder")
    hf = read_json_object(config_file)
    if hf.get("model_type") in HF_FAMILY_TYPES:
        return _read_hf_family_folder(path, hf, config_file, grid_hint, named)
    if hf.get("model_type") not in ("vit", "vit_mae", None):
        raise VitlabError(f"{config_file}: model_type {hf.get('model_type')!r} is not a ViT")
    state_dict = _read_hf_weights(path)
    notes = []
    if hf.get("model_type") == "vit_mae":  # ViTMAEModel / ViTMAEForPreTraining: a ViT's names; the decoder is dropped
        decoder = [k for k in state_dict if k.startswith("decoder.")]
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
        if decoder:
            notes.append(f"masked-autoencoder decoder dropped ({len(decoder)} tensors): the encoder is the ViT")
    act = hf.get("hidden_act", "gelu")
    gelu = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}.get(act)
    if gelu is None:
        raise VitlabError(f"{config_file}: hidden_act {act!r} is not a GELU; vitlab's ViT supports gelu and "
                          "gelu_pytorch_tanh")
    size = hf.get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = hf.get("patch_size", 16)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    hints = {"num_heads": hf.get("num_attention_heads", 12), "norm_eps": hf.get("layer_norm_eps", 1e-12),
             "gelu": gelu}
    hint = grid_hint or (size[0] // patch[0], size[1] // patch[1])
    ckpt = _from_state_dict(source, "hf-folder", state_dict, [], hint, named, hf_config=hints)
    ckpt.notes.extend(notes)
    _hf_names_and_preprocessing(ckpt, hf, path)
    return ckpt


def _hf_names_and_preprocessing(ckpt: Checkpoint, hf: dict, path: Path) -> None:
    """Class names from ``id2label`` (not transformers' placeholders) and ``preprocessor_config.json``."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == ckpt.config.num_classes:
        names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(ckpt.config.num_classes)]
        if names != [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholder labels carry nothing
            ckpt.class_names = names
    pre_file = path / "preprocessor_config.json"
    if pre_file.is_file():
        ckpt.preprocessing = _hf_preprocessing(pre_file, ckpt.config)


def _read_hf_family_folder(path: Path, hf: dict, config_file: Path, grid_hint: tuple[int, int] | None,
                           named: ViTConfig | None) -> Checkpoint:
    """A transformers DINOv2 / DeiT / SigLIP / CLIP folder: the architecture from its (vision) config, the weights
    through :mod:`.family_layouts`."""
    layout, vision = hf_vision_config(hf, str(config_file))
    hints = hf_hints(vision, str(config_file))
    img, patch = hints.pop("img_size"), hints.pop("patch_size")
    if vision.get("layerscale_value") is not None:
        hints["layer_scale"] = float(vision["layerscale_value"])
    remainder = bool(img[0] % patch[0] or img[1] % patch[1])  # SigLIP So400m/14 at 384: the last pixels unused
    if remainder:
        hints["drop_remainder"] = True
    hint = grid_hint or (img[0] // patch[0], img[1] // patch[1])
    ckpt = _from_state_dict(str(path), "hf-folder", _read_hf_weights(path), [], hint, named, hf_config=hints)
    if remainder:
        ckpt.config = ckpt.config.replace(img_size=img)
    ckpt.notes.append(f"transformers {', '.join(hf.get('architectures') or [hf.get('model_type')])} ({layout})")
    _hf_names_and_preprocessing(ckpt, hf, path)
    return ckpt


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        sniff(single)
        return read_safetensors(single)[0]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            sniff(shard_path)
            tensors.update(read_safetensors(shard_path)[0])
        return tensors
    bin_file = path / "pytorch_model.bin"
    if bin_file.is_file():
        sniff(bin_file)
        return unwrap_state_dict(read_torch(bin_file), str(bin_file))[0]
    raise VitlabError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hf_preprocessing(pre_file: Path, cfg: ViTConfig) -> Preprocessing:
    pre = read_json_object(pre_file)
    size = pre.get("size", {})
    img = (size.get("height", cfg.img_size[0]), size.get("width", cfg.img_size[1])) if isinstance(size, dict) \
        else cfg.img_size
    mean = pre.get("image_mean", [0.5] * cfg.in_chans) if pre.get("do_normalize", True) else [0.0] * cfg.in_chans
    std = pre.get("image_std", [0.5] * cfg.in_chans) if pre.get("do_normalize", True) else [1.0] * cfg.in_chans
    interpolation = _PIL_RESAMPLE.get(pre.get("resample", 2), "bilinear")
    crop = pre.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size and pre.get("do_center_crop") and isinstance(crop, dict):
        # CLIP / DINOv2 processors: the shorter side to shortest_edge, then a centre crop of crop_size
        img = (crop.get("height", cfg.img_size[0]), crop.get("width", cfg.img_size[1]))
        return Preprocessing(img, resize="crop", crop_pct=min(img) / size["shortest_edge"],
                             interpolation=interpolation, mean=mean, std=std, channels=cfg.in_chans)
    return Preprocessing(img, resize="squash", interpolation=interpolation, mean=mean, std=std,
                         channels=cfg.in_chans)


def _source_size_with_remainder(ckpt: Checkpoint, resolved) -> None:
    """A ``drop_remainder`` model (SigLIP So400m/14 at 384 px: a 27x27 grid) is published at a size the weights
    cannot show (the grid times the patch is 378): take the source's input size when it gives the same grid."""
    cfg, pre = ckpt.config, getattr(resolved, "preprocessing", None)
    if pre is None or not getattr(cfg, "drop_remainder", False) or tuple(pre.img_size) == tuple(cfg.img_size):
        return
    if tuple(s // p for s, p in zip(pre.img_size, cfg.patch_size)) == tuple(cfg.grid_size):
        ckpt.config = cfg.replace(img_size=tuple(pre.img_size))


def _check_named(ckpt: Checkpoint, named: ViTConfig, model_name: str) -> None:
    have = ckpt.config
    diffs = [f"{f} {getattr(have, f)} (model: {getattr(named, f)})" for f in _ARCH_FIELDS
             if getattr(have, f) != getattr(named, f)]
    if diffs:
        raise VitlabError(f"{ckpt.path}: the weights are not a {model_name}: " + ", ".join(diffs))


def construct_uninitialised(model_class: type, config) -> nn.Module:
    """``model_class(config)`` without running its ``init_weights``: every parameter is about to be overwritten from
    a checkpoint (a new head is zero-initialised by the constructor itself), so random initialisation is wasted time
    (about half of the construction time of a ViT-B)."""
    skipping = type(model_class.__name__, (model_class,), {"init_weights": lambda self: None})
    model = skipping(config)
    model.__class__ = model_class
    return model


def _is_finite(t: torch.Tensor) -> bool:
    # a finite sum proves every element finite (NaN and Inf propagate); only an overflowing sum needs the full check
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(ckpt: Checkpoint) -> None:
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not _is_finite(v)]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise VitlabError(f"{ckpt.path}: non-finite weights (NaN or Inf) in {len(bad)} tensor(s): {shown}")


def _record_facts(ckpt: Checkpoint) -> None:
    sd = ckpt.state_dict
    head = sd.get("head.weight")
    zeroed = head is not None and not head.any().item()
    ckpt.facts["zeroed_head"] = bool(zeroed)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    ckpt.facts.setdefault("dtypes", dtypes)
    ckpt.facts["tensors"] = len(sd)
    ckpt.facts["params"] = int(sum(v.numel() for v in sd.values()))


def zeroed_head_note(ckpt: Checkpoint) -> str | None:
    """The note to show for an all-zero head, or None when the head is not all zeros."""
    if not ckpt.facts.get("zeroed_head"):
        return None
    if ckpt.format in ("vit_jax", "big_vision"):
        return ("the classification head is all zeros (the original ImageNet-21k releases zeroed it on purpose): its "
                "logits are meaningless; load with num_classes=... to fine-tune a new head")
    return "the classification head is all zeros (untrained or deliberately zeroed): every class gets the same logit"


# ------------------------------------------------------------------------------------------------- building
def target_config(ckpt: Checkpoint, *, model_name: str | None = None, img_size=None, num_classes: int | None = None,
                  drop_pre_logits: bool = False, gelu: str | None = None,
                  in_chans: int | None = None, patch_size=None) -> tuple[object, bool]:
    """The config of the model to build and whether it gets a new (zero-initialised) head."""
    cfg = ckpt.config
    changes: dict = {}
    if in_chans is not None and in_chans != cfg.in_chans:
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
            raise VitlabError(f"{ckpt.path}: in_chans must be a positive integer, got {in_chans!r}")
        changes["in_chans"] = in_chans
    if patch_size is not None:
        if not has_tokens(cfg):
            raise VitlabError(f"{ckpt.path}: patch_size: a {type(cfg).__name__} has no patch embedding")
        changes["patch_size"] = patch_size
    if img_size is None and model_name is not None:
        implied = resolve(model_name)[1].get("img_size")  # an alias like vit_base_patch16_384 fixes the resolution
        img_size = implied
    if img_size is not None:
        changes["img_size"] = img_size
    if gelu is not None:
        changes["gelu"] = gelu
    new_head = False
    if drop_pre_logits and getattr(cfg, "representation_size", None):
        changes["representation_size"] = None
        new_head = True
    if num_classes is not None and num_classes != cfg.num_classes:
        new_head = True
    if new_head:
        changes["num_classes"] = cfg.num_classes if num_classes is None else num_classes
    try:
        return cfg.replace(**changes) if changes else cfg, new_head
    except ValueError as exc:
        raise VitlabError(f"{ckpt.path}: {exc}") from None


def adapt_state_dict(ckpt: Checkpoint, target, new_head: bool, resample: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict changed to fit ``target``: position embedding resampled to the new grid, head (and
    pre-logits when the target drops them) removed when a new head is made."""
    method = check_method(resample or ckpt.default_resample)
    sd = dict(ckpt.state_dict)
    src = ckpt.config
    if has_tokens(src) and tuple(target.grid_size) != tuple(src.grid_size):  # CNNs: nothing to resample
        if src.pos_embed == "learned" and "pos_embed" in sd:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], target.grid_size, src.grid_size,
                                                 num_prefix_tokens=src.num_pos_prefix, method=method)
        elif src.pos_embed == "learned_2d":
            sd["pos_embed_y"] = resample_1d(sd["pos_embed_y"], target.grid_size[0], method)
            sd["pos_embed_x"] = resample_1d(sd["pos_embed_x"], target.grid_size[1], method)
    kernel = sd.get("patch_embed.proj.weight")
    if kernel is not None and tuple(kernel.shape[-2:]) != tuple(target.patch_size):  # FlexiViT's kernel resize
        sd["patch_embed.proj.weight"] = resample_patch_embed(kernel, target.patch_size)
    if new_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
        if not getattr(target, "representation_size", None):
            sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
    return adapt_state_dict_channels(sd, src.in_chans, target.in_chans)  # timm's adapt_input_conv rule


def check_fit(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str,
              fresh_prefixes: tuple[str, ...] = ()) -> None:
    """Raise one error listing every missing key (except parameters deliberately left fresh, e.g. a new head),
    unexpected key and mis-shaped tensor (file shape vs model shape) of ``state_dict`` against ``expected``."""
    own = expected
    missing = [k for k in own if k not in state_dict and not k.startswith(fresh_prefixes)]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in state_dict
             if k in own and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:20])
                             + (f", ... ({len(items) - 20} more)" if len(items) > 20 else ""))
        raise VitlabError(f"{source}: the weights do not fit the model; " + "; ".join(parts))


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                fresh_prefixes: tuple[str, ...] = ()) -> None:
    """``model.load_state_dict(strict=True)`` after :func:`check_fit`, so that every mismatch is reported at once."""
    own = model.state_dict()
    check_fit(own, state_dict, source, fresh_prefixes)
    merged = {k: (state_dict[k] if k in state_dict else v) for k, v in own.items()}
    model.load_state_dict(merged, strict=True)


def model_from_checkpoint(ckpt: Checkpoint, *, model_name: str | None = None, img_size=None,
                          num_classes: int | None = None, resample: str | None = None, drop_pre_logits: bool = False,
                          gelu: str | None = None, in_chans: int | None = None, patch_size=None) -> nn.Module:
    """A model in eval mode with the checkpoint's weights, adapted as asked, with ``preprocessing`` and
    ``class_names`` attributes set. Warns (:class:`CheckpointWarning`) when a zeroed head is kept."""
    target, new_head = target_config(ckpt, model_name=model_name, img_size=img_size, num_classes=num_classes,
                                     drop_pre_logits=drop_pre_logits, gelu=gelu, in_chans=in_chans,
                                     patch_size=patch_size)
    state_dict = adapt_state_dict(ckpt, target, new_head, resample)
    model = construct_uninitialised(ckpt.architecture.model_class, target)
    fresh = ("head.", "head_dist.", "pre_logits.") if new_head else ()
    load_strict(model, state_dict, ckpt.path, fresh)
    if ckpt.facts.get("zeroed_head") and not new_head and ckpt.format in ("vit_jax", "big_vision"):
        warnings.warn(f"{ckpt.path}: the classification head is all zeros (an ImageNet-21k pre-training release); "
                      "its logits are constant. Pass num_classes=... to fine-tune a new head.", CheckpointWarning,
                      stacklevel=3)
    model.preprocessing = adapt_preprocessing_channels(ckpt.preprocessing.replace(img_size=target.img_size),
                                                      target.in_chans)
    model.class_names = None if new_head else ckpt.class_names
    # the loss the head was trained with (vitlab training records it): sigmoid heads give per-label probabilities
    loss = ckpt.metadata.get("loss") if isinstance(ckpt.metadata, dict) else None
    model.loss = loss if loss in ("softmax", "sigmoid") and not new_head else None
    return model.eval()
