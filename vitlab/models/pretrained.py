"""The catalog of pre-trained checkpoints: one table of named entries, next to the model table it builds on.

An entry is named ``<model>.<tag>`` (``vit_b16.augreg_in21k_ft_in1k``): ``<model>`` is a registered model name and
``<tag>`` says how the weights were made (``orig`` = the paper's release, ``augreg`` = "How to train your ViT?",
``goog`` = BiT; ``in21k`` = ImageNet-21k pre-training, ``_ft_in1k`` = then fine-tuned on ImageNet-1k; a trailing
``_384`` gives a resolution other than 224). Each entry records what the weights are (resolution, classes, label
set, parameter count), how the publisher evaluated them, where to get them (one or more sources, tried in order) and
the accuracy reported for them. Nothing here downloads anything: :mod:`vitlab.hub` turns an entry into a local file.

Facts come from public sources: timm's ``default_cfgs`` (``timm/models/vision_transformer.py`` and ``eva.py``, timm
1.0.31: Hub repos, GCS file names, input size, crop, mean/std, interpolation, licence), the vit_jax README (the
original file names), the paper (Table 5) and timm's ``results/results-imagenet.csv`` (top-1 that timm measured on
the same weights). Parameter counts are timm's for the same architecture and head (plus the pre-logits layer the
original ImageNet-21k files carry). File sizes and sha256 sums are recorded only where a publisher states them; none
of the sources above does, so they are ``None`` and downloads are checked for being a readable checkpoint instead.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

from ..errors import UnknownNameError
from .registry import resolve

IMAGENET_1K = "imagenet-1k"
IMAGENET_21K = "imagenet-21k"
LABEL_SETS = {IMAGENET_1K: 1000, IMAGENET_21K: 21843}


@dataclass(frozen=True)
class PublisherPreprocessing:
    """How the publisher evaluated the weights: ``squash`` resizes straight to the square resolution, ``crop``
    resizes the shorter side to ``size / crop_pct`` and centre-crops; then ``(x - mean) / std`` on [0, 1] pixels."""

    resize: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


# vit_jax / big_vision evaluation: squash to the model size, bilinear, [-1, 1]; BiT evaluates the same way
VIT_JAX_EVAL = PublisherPreprocessing()


@dataclass(frozen=True)
class Source:
    """Where a checkpoint can be fetched. ``kind``: ``gcs`` (``gs://bucket/path``, public over HTTPS), ``url``
    (``https://...``), ``timm`` (a Hub repo in timm's layout: model.safetensors + config.json) or ``transformers``
    (a Hub repo in transformers' layout). ``size`` (bytes) and ``sha256`` only where the publisher states them.
    ``note`` says how the file differs from the entry, when it does (e.g. a head removed by the converter)."""

    kind: str
    location: str
    size: int | None = None
    sha256: str | None = None
    note: str = ""

    @property
    def spec(self) -> str:
        """The string :func:`vitlab.load` accepts for this source alone."""
        return f"hf-hub:{self.location}" if self.kind in ("timm", "transformers") else self.location


@dataclass(frozen=True)
class PretrainedEntry:
    """One pre-trained checkpoint. ``params`` counts the weights as the first source stores them (head included);
    ``representation_size`` is the pre-logits width of files that keep that layer; ``top1_paper`` is the ImageNet
    top-1 the paper reports, ``top1_timm`` what timm measured on the same weights (``results-imagenet.csv``)."""

    name: str
    model: str
    img_size: int
    num_classes: int
    labels: str
    params: int
    sources: tuple[Source, ...]
    preprocessing: PublisherPreprocessing = VIT_JAX_EVAL
    representation_size: int | None = None
    license: str = "apache-2.0"
    top1_paper: float | None = None
    top1_timm: float | None = None
    description: str = ""
    image_text: str = ""  # a transformers CLIPModel / SiglipModel Hub repo with both towers (vitlab.load_image_text)

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def top1(self) -> float | None:
        """The accuracy to expect from ``vitlab eval`` on ImageNet val: timm's measurement, else the paper's."""
        return self.top1_timm if self.top1_timm is not None else self.top1_paper

    @property
    def top1_source(self) -> str | None:
        """Who reported :attr:`top1`: ``"timm"`` (its measurement), ``"paper"``, or None without a number."""
        if self.top1_timm is not None:
            return "timm"
        return "paper" if self.top1_paper is not None else None


def _gcs(path: str, note: str = "") -> Source:
    return Source("gcs", f"gs://{path}", note=note)


def _timm(repo: str, note: str = "") -> Source:
    return Source("timm", f"timm/{repo}", note=note)


def _hf(repo: str, note: str = "") -> Source:
    return Source("transformers", f"google/{repo}", note=note)


def _tf(repo: str, note: str = "") -> Source:
    """A transformers-layout Hub repo under any organisation (``facebook/dinov2-base``)."""
    return Source("transformers", repo, note=note)


def _url(url: str) -> Source:
    return Source("url", url)


_NO_HEAD_TIMM = "timm's copy drops the pre-logits layer and the zeroed head (num_classes 0)"
_NO_HEAD_HF = "transformers' copy keeps the pre-logits layer as its pooler and drops the zeroed head"
_AUGREG = "vit_models/augreg/"


def _timm_crop(img_size: int) -> PublisherPreprocessing:
    """timm's evaluation for the AugReg-2 weights that only it publishes: bicubic, crop 0.9 (1.0 from 384 up)."""
    return PublisherPreprocessing("crop", 0.9 if img_size < 384 else 1.0, "bicubic")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# DeiT / DeiT III (facebookresearch/deit datasets.py: shorter side to size / 0.875, centre crop; from 384 the crop
# is the whole image) and DINOv2 (its classification eval transform: 256 -> 224 crop), bicubic, ImageNet statistics
_FB_EVAL = PublisherPreprocessing("crop", 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_FB_EVAL_384 = PublisherPreprocessing("crop", 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
# SigLIP (transformers' SiglipImageProcessor, big_vision's eval): squash to the size, bicubic, [-1, 1]
_SIGLIP_EVAL = PublisherPreprocessing("squash", 1.0, "bicubic")
# OpenAI CLIP: shorter side to the size, centre crop, bicubic, CLIP's statistics
_CLIP_EVAL = PublisherPreprocessing("crop", 1.0, "bicubic", CLIP_MEAN, CLIP_STD)
_FB = "https://dl.fbaipublicfiles.com/"
_TOWER = "the full model: vitlab reads its vision tower"

E = PretrainedEntry
# ---------------------------------------------------------------------------------------------------------- the table
CATALOG: tuple[PretrainedEntry, ...] = (
    # --- the paper's ImageNet-21k releases (vit_jax "imagenet21k/"): 21,843 classes, head zeroed, pre-logits kept
    E("vit_b16.orig_in21k", "vit_b16", 224, 21843, IMAGENET_21K, 103_186_515,
      (_gcs("vit_models/imagenet21k/ViT-B_16.npz"), _timm("vit_base_patch16_224.orig_in21k", _NO_HEAD_TIMM),
       _hf("vit-base-patch16-224-in21k", _NO_HEAD_HF)), representation_size=768,
      description="ViT-B/16, ImageNet-21k (paper)"),
    E("vit_b32.orig_in21k", "vit_b32", 224, 21843, IMAGENET_21K, 104_843_091,
      (_gcs("vit_models/imagenet21k/ViT-B_32.npz"), _timm("vit_base_patch32_224.orig_in21k", _NO_HEAD_TIMM),
       _hf("vit-base-patch32-224-in21k", _NO_HEAD_HF)), representation_size=768,
      description="ViT-B/32, ImageNet-21k (paper)"),
    E("vit_l16.orig_in21k", "vit_l16", 224, 21843, IMAGENET_21K, 326_740_307,
      (_gcs("vit_models/imagenet21k/ViT-L_16.npz"), _timm("vit_large_patch16_224.orig_in21k", _NO_HEAD_TIMM),
       _hf("vit-large-patch16-224-in21k", _NO_HEAD_HF)), representation_size=1024,
      description="ViT-L/16, ImageNet-21k (paper)"),
    E("vit_l32.orig_in21k", "vit_l32", 224, 21843, IMAGENET_21K, 328_949_075,
      (_gcs("vit_models/imagenet21k/ViT-L_32.npz"), _timm("vit_large_patch32_224.orig_in21k", _NO_HEAD_TIMM),
       _hf("vit-large-patch32-224-in21k", _NO_HEAD_HF)), representation_size=1024,
      description="ViT-L/32, ImageNet-21k (paper)"),
    E("vit_h14.orig_in21k", "vit_h14", 224, 21843, IMAGENET_21K, 660_385_363,
      (_gcs("vit_models/imagenet21k/ViT-H_14.npz"), _timm("vit_huge_patch14_224.orig_in21k", _NO_HEAD_TIMM),
       _hf("vit-huge-patch14-224-in21k", _NO_HEAD_HF)), representation_size=1280,
      description="ViT-H/14, ImageNet-21k (paper)"),
    E("r50_vit_b16.orig_in21k", "r50_vit_b16", 224, 21843, IMAGENET_21K, 115_277_971,
      (_gcs("vit_models/imagenet21k/R50+ViT-B_16.npz"), _timm("vit_base_r50_s16_224.orig_in21k", _NO_HEAD_TIMM)),
      representation_size=768, description="R50+ViT-B/16 hybrid, ImageNet-21k (paper)"),
    E("r26_vit_b32.orig_in21k", "r26_vit_b32", 224, 21843, IMAGENET_21K, 118_002_835,
      (_gcs("vit_models/imagenet21k/R26+ViT-B_32.npz"),), representation_size=768,
      description="R26+ViT-B/32 hybrid, ImageNet-21k (paper)"),
    E("r50_vit_l32.orig_in21k", "r50_vit_l32", 224, 21843, IMAGENET_21K, 351_408_531,
      (_gcs("vit_models/imagenet21k/R50+ViT-L_32.npz"),), representation_size=1024,
      description="R50+ViT-L/32 hybrid, ImageNet-21k (paper)"),
    # --- the paper's ImageNet-21k -> ImageNet-1k fine-tuned releases (vit_jax "imagenet21k+imagenet2012/")
    E("vit_b16.orig_in21k_ft_in1k", "vit_b16", 224, 1000, IMAGENET_1K, 86_567_656,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-B_16-224.npz"), _timm("vit_base_patch16_224.orig_in21k_ft_in1k"),
       _hf("vit-base-patch16-224")), top1_timm=81.786, description="ViT-B/16, ImageNet-21k -> 1k at 224 (paper)"),
    E("vit_b16.orig_in21k_ft_in1k_384", "vit_b16", 384, 1000, IMAGENET_1K, 86_859_496,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-B_16.npz"), _timm("vit_base_patch16_384.orig_in21k_ft_in1k"),
       _hf("vit-base-patch16-384")), top1_paper=83.97, top1_timm=84.200,
      description="ViT-B/16, ImageNet-21k -> 1k at 384 (paper)"),
    E("vit_b32.orig_in21k_ft_in1k_384", "vit_b32", 384, 1000, IMAGENET_1K, 88_297_192,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-B_32.npz"), _hf("vit-base-patch32-384")), top1_paper=81.28,
      description="ViT-B/32, ImageNet-21k -> 1k at 384 (paper)"),
    E("vit_l16.orig_in21k_ft_in1k", "vit_l16", 224, 1000, IMAGENET_1K, 304_326_632,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-L_16-224.npz"), _hf("vit-large-patch16-224")),
      description="ViT-L/16, ImageNet-21k -> 1k at 224 (paper)"),
    E("vit_l16.orig_in21k_ft_in1k_384", "vit_l16", 384, 1000, IMAGENET_1K, 304_715_752,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-L_16.npz"), _hf("vit-large-patch16-384")), top1_paper=85.15,
      description="ViT-L/16, ImageNet-21k -> 1k at 384 (paper)"),
    E("vit_l32.orig_in21k_ft_in1k_384", "vit_l32", 384, 1000, IMAGENET_1K, 306_632_680,
      (_gcs("vit_models/imagenet21k+imagenet2012/ViT-L_32.npz"), _timm("vit_large_patch32_384.orig_in21k_ft_in1k"),
       _hf("vit-large-patch32-384")), top1_paper=80.99, top1_timm=81.510,
      description="ViT-L/32, ImageNet-21k -> 1k at 384 (paper)"),
    E("r50_vit_b16.orig_in21k_ft_in1k_384", "r50_vit_b16", 384, 1000, IMAGENET_1K, 98_950_952,
      (_gcs("vit_models/imagenet21k+imagenet2012/R50+ViT-B_16.npz"), _timm("vit_base_r50_s16_384.orig_in21k_ft_in1k")),
      top1_timm=84.976, description="R50+ViT-B/16 hybrid, ImageNet-21k -> 1k at 384 (paper)"),
    # --- AugReg ("How to train your ViT?"): the recommended ImageNet-21k checkpoint per size and its ImageNet-1k
    #     fine-tunes, big_vision layout
    E("vit_ti16.augreg_in21k", "vit_ti16", 224, 21843, IMAGENET_21K, 9_740_115,
      (_gcs(_AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_tiny_patch16_224.augreg_in21k")), description="ViT-Ti/16, ImageNet-21k (AugReg)"),
    E("vit_ti16.augreg_in21k_ft_in1k", "vit_ti16", 224, 1000, IMAGENET_1K, 5_717_416,
      (_gcs(_AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k")), top1_timm=75.454,
      description="ViT-Ti/16, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_ti16.augreg_in21k_ft_in1k_384", "vit_ti16", 384, 1000, IMAGENET_1K, 5_790_376,
      (_gcs(_AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_tiny_patch16_384.augreg_in21k_ft_in1k")), top1_timm=78.424,
      description="ViT-Ti/16, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("vit_s16.augreg_in21k", "vit_s16", 224, 21843, IMAGENET_21K, 30_075_219,
      (_gcs(_AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_small_patch16_224.augreg_in21k")), description="ViT-S/16, ImageNet-21k (AugReg)"),
    E("vit_s16.augreg_in21k_ft_in1k", "vit_s16", 224, 1000, IMAGENET_1K, 22_050_664,
      (_gcs(_AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_small_patch16_224.augreg_in21k_ft_in1k")), top1_timm=81.384,
      description="ViT-S/16, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_s16.augreg_in21k_ft_in1k_384", "vit_s16", 384, 1000, IMAGENET_1K, 22_196_584,
      (_gcs(_AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_small_patch16_384.augreg_in21k_ft_in1k")), top1_timm=83.802,
      description="ViT-S/16, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("vit_s32.augreg_in21k", "vit_s32", 224, 21843, IMAGENET_21K, 30_903_507,
      (_gcs(_AUGREG + "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_small_patch32_224.augreg_in21k")), description="ViT-S/32, ImageNet-21k (AugReg)"),
    E("vit_s32.augreg_in21k_ft_in1k", "vit_s32", 224, 1000, IMAGENET_1K, 22_878_952,
      (_gcs(_AUGREG + "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_small_patch32_224.augreg_in21k_ft_in1k")), top1_timm=75.994,
      description="ViT-S/32, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_s32.augreg_in21k_ft_in1k_384", "vit_s32", 384, 1000, IMAGENET_1K, 22_915_432,
      (_gcs(_AUGREG + "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_small_patch32_384.augreg_in21k_ft_in1k")), top1_timm=80.486,
      description="ViT-S/32, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("vit_b16.augreg_in21k", "vit_b16", 224, 21843, IMAGENET_21K, 102_595_923,
      (_gcs(_AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"),
       _timm("vit_base_patch16_224.augreg_in21k")), description="ViT-B/16, ImageNet-21k (AugReg)"),
    E("vit_b16.augreg_in21k_ft_in1k", "vit_b16", 224, 1000, IMAGENET_1K, 86_567_656,
      (_gcs(_AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                      "res_224.npz"), _timm("vit_base_patch16_224.augreg_in21k_ft_in1k")), top1_timm=84.532,
      description="ViT-B/16, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_b16.augreg_in21k_ft_in1k_384", "vit_b16", 384, 1000, IMAGENET_1K, 86_859_496,
      (_gcs(_AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                      "res_384.npz"), _timm("vit_base_patch16_384.augreg_in21k_ft_in1k")), top1_timm=85.996,
      description="ViT-B/16, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("vit_b16.augreg2_in21k_ft_in1k", "vit_b16", 224, 1000, IMAGENET_1K, 86_567_656,
      (_timm("vit_base_patch16_224.augreg2_in21k_ft_in1k"),), preprocessing=_timm_crop(224), top1_timm=85.096,
      description="ViT-B/16, AugReg ImageNet-21k re-fine-tuned on 1k by timm (timm's default)"),
    E("vit_b32.augreg_in21k", "vit_b32", 224, 21843, IMAGENET_21K, 104_252_499,
      (_gcs(_AUGREG + "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_base_patch32_224.augreg_in21k")), description="ViT-B/32, ImageNet-21k (AugReg)"),
    E("vit_b32.augreg_in21k_ft_in1k", "vit_b32", 224, 1000, IMAGENET_1K, 88_224_232,
      (_gcs(_AUGREG + "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_base_patch32_224.augreg_in21k_ft_in1k")), top1_timm=80.716,
      description="ViT-B/32, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_b32.augreg_in21k_ft_in1k_384", "vit_b32", 384, 1000, IMAGENET_1K, 88_297_192,
      (_gcs(_AUGREG + "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_base_patch32_384.augreg_in21k_ft_in1k")), top1_timm=83.350,
      description="ViT-B/32, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("vit_l16.augreg_in21k", "vit_l16", 224, 21843, IMAGENET_21K, 325_690_707,
      (_gcs(_AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz"),
       _timm("vit_large_patch16_224.augreg_in21k")), description="ViT-L/16, ImageNet-21k (AugReg)"),
    E("vit_l16.augreg_in21k_ft_in1k", "vit_l16", 224, 1000, IMAGENET_1K, 304_326_632,
      (_gcs(_AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-"
                      "res_224.npz"), _timm("vit_large_patch16_224.augreg_in21k_ft_in1k")), top1_timm=85.834,
      description="ViT-L/16, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("vit_l16.augreg_in21k_ft_in1k_384", "vit_l16", 384, 1000, IMAGENET_1K, 304_715_752,
      (_gcs(_AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-"
                      "res_384.npz"), _timm("vit_large_patch16_384.augreg_in21k_ft_in1k")), top1_timm=87.084,
      description="ViT-L/16, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("r_vit_ti16.augreg_in21k", "r_vit_ti16", 224, 21843, IMAGENET_21K, 10_360_403,
      (_gcs(_AUGREG + "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_tiny_r_s16_p8_224.augreg_in21k")), description="R+ViT-Ti/16 hybrid, ImageNet-21k (AugReg)"),
    E("r_vit_ti16.augreg_in21k_ft_in1k", "r_vit_ti16", 224, 1000, IMAGENET_1K, 6_337_704,
      (_gcs(_AUGREG + "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k")), top1_timm=71.798,
      description="R+ViT-Ti/16 hybrid, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("r_vit_ti16.augreg_in21k_ft_in1k_384", "r_vit_ti16", 384, 1000, IMAGENET_1K, 6_355_944,
      (_gcs(_AUGREG + "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_tiny_r_s16_p8_384.augreg_in21k_ft_in1k")), top1_timm=75.962,
      description="R+ViT-Ti/16 hybrid, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("r26_vit_s32.augreg_in21k", "r26_vit_s32", 224, 21843, IMAGENET_21K, 44_456_467,
      (_gcs(_AUGREG + "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0.npz"),
       _timm("vit_small_r26_s32_224.augreg_in21k")), description="R26+ViT-S/32 hybrid, ImageNet-21k (AugReg)"),
    E("r26_vit_s32.augreg_in21k_ft_in1k", "r26_vit_s32", 224, 1000, IMAGENET_1K, 36_431_912,
      (_gcs(_AUGREG + "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.03-"
                      "res_224.npz"), _timm("vit_small_r26_s32_224.augreg_in21k_ft_in1k")), top1_timm=81.864,
      description="R26+ViT-S/32 hybrid, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("r26_vit_s32.augreg_in21k_ft_in1k_384", "r26_vit_s32", 384, 1000, IMAGENET_1K, 36_468_392,
      (_gcs(_AUGREG + "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-"
                      "res_384.npz"), _timm("vit_small_r26_s32_384.augreg_in21k_ft_in1k")), top1_timm=84.048,
      description="R26+ViT-S/32 hybrid, ImageNet-21k -> 1k at 384 (AugReg)"),
    E("r50_vit_l32.augreg_in21k", "r50_vit_l32", 224, 21843, IMAGENET_21K, 350_358_931,
      (_gcs(_AUGREG + "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz"),
       _timm("vit_large_r50_s32_224.augreg_in21k")), description="R50+ViT-L/32 hybrid, ImageNet-21k (AugReg)"),
    E("r50_vit_l32.augreg_in21k_ft_in1k", "r50_vit_l32", 224, 1000, IMAGENET_1K, 328_994_856,
      (_gcs(_AUGREG + "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-"
                      "res_224.npz"), _timm("vit_large_r50_s32_224.augreg_in21k_ft_in1k")), top1_timm=84.422,
      description="R50+ViT-L/32 hybrid, ImageNet-21k -> 1k at 224 (AugReg)"),
    E("r50_vit_l32.augreg_in21k_ft_in1k_384", "r50_vit_l32", 384, 1000, IMAGENET_1K, 329_092_136,
      (_gcs(_AUGREG + "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                      "res_384.npz"), _timm("vit_large_r50_s32_384.augreg_in21k_ft_in1k")), top1_timm=86.182,
      description="R50+ViT-L/32 hybrid, ImageNet-21k -> 1k at 384 (AugReg)"),
    # --- the paper's convolutional baseline: BiT-M ResNet-50x1 (ImageNet-21k), and its ImageNet-1k fine-tune
    E("bit_r50x1.goog_in21k", "bit_r50x1", 224, 21843, IMAGENET_21K, 68_256_659,
      (_gcs("bit_models/BiT-M-R50x1.npz"), _timm("resnetv2_50x1_bit.goog_in21k")),
      description="BiT-M ResNet-50x1, ImageNet-21k (baseline)"),
    E("bit_r50x1.goog_in21k_ft_in1k_448", "bit_r50x1", 448, 1000, IMAGENET_1K, 25_549_352,
      (_gcs("bit_models/BiT-M-R50x1-ILSVRC2012.npz"), _timm("resnetv2_50x1_bit.goog_in21k_ft_in1k")),
      top1_timm=80.340, description="BiT-M ResNet-50x1, ImageNet-21k -> 1k at 448 (baseline)"),
    # --- DeiT (Touvron et al. 2021): ImageNet-1k only; top-1 as the DeiT paper reports it. transformers holds the
    #     plain ones as ViTForImageClassification, the distilled ones as DeiTForImageClassificationWithTeacher
    E("deit_ti16.fb_in1k", "deit_ti16", 224, 1000, IMAGENET_1K, 5_717_416,
      (_url(_FB + "deit/deit_tiny_patch16_224-a1311bcf.pth"), _timm("deit_tiny_patch16_224.fb_in1k"),
       _tf("facebook/deit-tiny-patch16-224")), _FB_EVAL, top1_paper=72.2, description="DeiT-Ti/16, ImageNet-1k"),
    E("deit_s16.fb_in1k", "deit_s16", 224, 1000, IMAGENET_1K, 22_050_664,
      (_url(_FB + "deit/deit_small_patch16_224-cd65a155.pth"), _timm("deit_small_patch16_224.fb_in1k"),
       _tf("facebook/deit-small-patch16-224")), _FB_EVAL, top1_paper=79.8, description="DeiT-S/16, ImageNet-1k"),
    E("deit_b16.fb_in1k", "deit_b16", 224, 1000, IMAGENET_1K, 86_567_656,
      (_url(_FB + "deit/deit_base_patch16_224-b5f2ef4d.pth"), _timm("deit_base_patch16_224.fb_in1k"),
       _tf("facebook/deit-base-patch16-224")), _FB_EVAL, top1_paper=81.8, description="DeiT-B/16, ImageNet-1k"),
    E("deit_b16.fb_in1k_384", "deit_b16", 384, 1000, IMAGENET_1K, 86_859_496,
      (_url(_FB + "deit/deit_base_patch16_384-8de9b5d1.pth"), _timm("deit_base_patch16_384.fb_in1k"),
       _tf("facebook/deit-base-patch16-384")), _FB_EVAL_384, top1_paper=83.1,
      description="DeiT-B/16, ImageNet-1k, fine-tuned at 384"),
    E("deit_ti16_distilled.fb_in1k", "deit_ti16_distilled", 224, 1000, IMAGENET_1K, 5_910_800,
      (_url(_FB + "deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth"),
       _timm("deit_tiny_distilled_patch16_224.fb_in1k"), _tf("facebook/deit-tiny-distilled-patch16-224")),
      _FB_EVAL, top1_paper=74.5, description="DeiT-Ti/16 distilled from a RegNetY teacher, ImageNet-1k"),
    E("deit_s16_distilled.fb_in1k", "deit_s16_distilled", 224, 1000, IMAGENET_1K, 22_436_432,
      (_url(_FB + "deit/deit_small_distilled_patch16_224-649709d9.pth"),
       _timm("deit_small_distilled_patch16_224.fb_in1k"), _tf("facebook/deit-small-distilled-patch16-224")),
      _FB_EVAL, top1_paper=81.2, description="DeiT-S/16 distilled, ImageNet-1k"),
    E("deit_b16_distilled.fb_in1k", "deit_b16_distilled", 224, 1000, IMAGENET_1K, 87_338_192,
      (_url(_FB + "deit/deit_base_distilled_patch16_224-df68dfff.pth"),
       _timm("deit_base_distilled_patch16_224.fb_in1k"), _tf("facebook/deit-base-distilled-patch16-224")),
      _FB_EVAL, top1_paper=83.4, description="DeiT-B/16 distilled, ImageNet-1k"),
    E("deit_b16_distilled.fb_in1k_384", "deit_b16_distilled", 384, 1000, IMAGENET_1K, 87_630_032,
      (_url(_FB + "deit/deit_base_distilled_patch16_384-d0272ac0.pth"),
       _timm("deit_base_distilled_patch16_384.fb_in1k"), _tf("facebook/deit-base-distilled-patch16-384")),
      _FB_EVAL_384, top1_paper=85.2, description="DeiT-B/16 distilled, ImageNet-1k, fine-tuned at 384"),
    # --- DeiT III (Touvron et al. 2022): LayerScale, patch-only position embedding; top-1 from its README
    E("deit3_s16.fb_in1k", "deit3_s16", 224, 1000, IMAGENET_1K, 22_059_496,
      (_url(_FB + "deit/deit_3_small_224_1k.pth"), _timm("deit3_small_patch16_224.fb_in1k")), _FB_EVAL,
      top1_paper=81.4, description="DeiT III ViT-S/16, ImageNet-1k"),
    E("deit3_b16.fb_in1k", "deit3_b16", 224, 1000, IMAGENET_1K, 86_585_320,
      (_url(_FB + "deit/deit_3_base_224_1k.pth"), _timm("deit3_base_patch16_224.fb_in1k")), _FB_EVAL,
      top1_paper=83.8, description="DeiT III ViT-B/16, ImageNet-1k"),
    E("deit3_l16.fb_in1k", "deit3_l16", 224, 1000, IMAGENET_1K, 304_374_760,
      (_url(_FB + "deit/deit_3_large_224_1k.pth"), _timm("deit3_large_patch16_224.fb_in1k")), _FB_EVAL,
      top1_paper=84.9, description="DeiT III ViT-L/16, ImageNet-1k"),
    E("deit3_s16.fb_in22k_ft_in1k", "deit3_s16", 224, 1000, IMAGENET_1K, 22_059_496,
      (_url(_FB + "deit/deit_3_small_224_21k.pth"), _timm("deit3_small_patch16_224.fb_in22k_ft_in1k")),
      _FB_EVAL_384, top1_paper=83.1, description="DeiT III ViT-S/16, ImageNet-21k -> 1k"),
    E("deit3_b16.fb_in22k_ft_in1k", "deit3_b16", 224, 1000, IMAGENET_1K, 86_585_320,
      (_url(_FB + "deit/deit_3_base_224_21k.pth"), _timm("deit3_base_patch16_224.fb_in22k_ft_in1k")),
      _FB_EVAL_384, top1_paper=85.7, description="DeiT III ViT-B/16, ImageNet-21k -> 1k"),
    E("deit3_l16.fb_in22k_ft_in1k", "deit3_l16", 224, 1000, IMAGENET_1K, 304_374_760,
      (_url(_FB + "deit/deit_3_large_224_21k.pth"), _timm("deit3_large_patch16_224.fb_in22k_ft_in1k")),
      _FB_EVAL_384, top1_paper=87.0, description="DeiT III ViT-L/16, ImageNet-21k -> 1k"),
    # --- DINOv2 (Oquab et al. 2023; registers: Darcet et al. 2024): self-supervised on LVD-142M, features only,
    #     518 px; top1_paper is the ImageNet linear-probe top-1 of the DINOv2 README
    *(E(f"dinov2_{s}14{reg}.lvd142m", f"dinov2_{s}14{reg}", 518, 0, "", params,
        (_url(f"{_FB}dinov2/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"),
         _timm(f"vit_{long}_patch14{reg and '_reg4'}_dinov2.lvd142m"),
         _tf(f"facebook/dinov2-{'with-registers-' if reg else ''}{long}")), _FB_EVAL, top1_paper=top1,
        description=f"DINOv2 ViT-{s.upper() if s != 'g' else 'g'}/14{' with 4 registers' if reg else ''}, LVD-142M "
                    "(features; top-1: linear probe)")
      for s, long, reg, params, top1 in (
          ("s", "small", "", 22_056_192, 81.1), ("b", "base", "", 86_579_712, 84.5),
          ("l", "large", "", 304_367_616, 86.3), ("g", "giant", "", 1_136_479_232, 86.5),
          ("s", "small", "_reg4", 22_057_344, 80.9), ("b", "base", "_reg4", 86_582_016, 84.6),
          ("l", "large", "_reg4", 304_370_688, 86.7), ("g", "giant", "_reg4", 1_136_483_840, 87.1))),
    # --- SigLIP (Zhai et al. 2023) image towers, WebLI: MAP head, features only
    *(E(f"{model}.webli{'' if size == 224 or (model == 'siglip_l16' and size == 256) else f'_{size}'}", model, size,
        0, "", params, (_timm(f"{stem}_{size}.webli"), _tf(f"google/{repo}-{size}", _TOWER)), _SIGLIP_EVAL,
        description=f"SigLIP {title} image tower, WebLI, {size} px (features)", image_text=f"google/{repo}-{size}")
      for model, stem, repo, title, size, params in (
          ("siglip_b16", "vit_base_patch16_siglip", "siglip-base-patch16", "B/16", 224, 92_884_224),
          ("siglip_b16", "vit_base_patch16_siglip", "siglip-base-patch16", "B/16", 256, 92_930_304),
          ("siglip_b16", "vit_base_patch16_siglip", "siglip-base-patch16", "B/16", 384, 93_176_064),
          ("siglip_b16", "vit_base_patch16_siglip", "siglip-base-patch16", "B/16", 512, 93_520_128),
          ("siglip_l16", "vit_large_patch16_siglip", "siglip-large-patch16", "L/16", 256, 315_956_224),
          ("siglip_l16", "vit_large_patch16_siglip", "siglip-large-patch16", "L/16", 384, 316_283_904),
          ("siglip_so400m14", "vit_so400m_patch14_siglip", "siglip-so400m-patch14", "So400m/14", 224,
           427_680_704),
          ("siglip_so400m14", "vit_so400m_patch14_siglip", "siglip-so400m-patch14", "So400m/14", 384,
           428_225_600))),
    # --- CLIP (Radford et al. 2021) image towers: OpenAI's (QuickGELU) and LAION-2B's (OpenCLIP, exact GELU); the
    #     head is the image-to-text projection
    E("clip_b32_quickgelu.openai", "clip_b32_quickgelu", 224, 512, "", 87_849_728,
      (_timm("vit_base_patch32_clip_224.openai"), _tf("openai/clip-vit-base-patch32", _TOWER)), _CLIP_EVAL,
      license="mit", description="CLIP ViT-B/32 image tower, OpenAI (projection to 512)",
      image_text="openai/clip-vit-base-patch32"),
    E("clip_b16_quickgelu.openai", "clip_b16_quickgelu", 224, 512, "", 86_193_152,
      (_timm("vit_base_patch16_clip_224.openai"), _tf("openai/clip-vit-base-patch16", _TOWER)), _CLIP_EVAL,
      license="mit", description="CLIP ViT-B/16 image tower, OpenAI (projection to 512)",
      image_text="openai/clip-vit-base-patch16"),
    E("clip_l14_quickgelu.openai", "clip_l14_quickgelu", 224, 768, "", 303_966_976,
      (_timm("vit_large_patch14_clip_224.openai"), _tf("openai/clip-vit-large-patch14", _TOWER)), _CLIP_EVAL,
      license="mit", description="CLIP ViT-L/14 image tower, OpenAI (projection to 768)",
      image_text="openai/clip-vit-large-patch14"),
    E("clip_b32.laion2b", "clip_b32", 224, 512, "", 87_849_728, (_timm("vit_base_patch32_clip_224.laion2b"),),
      PublisherPreprocessing("crop", 0.9, "bicubic", CLIP_MEAN, CLIP_STD), license="mit",
      description="CLIP ViT-B/32 image tower, OpenCLIP on LAION-2B",
      image_text="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    E("clip_b16.laion2b", "clip_b16", 224, 512, "", 86_193_152, (_timm("vit_base_patch16_clip_224.laion2b"),),
      _CLIP_EVAL, license="mit", description="CLIP ViT-B/16 image tower, OpenCLIP on LAION-2B",
      image_text="laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    E("clip_l14.laion2b", "clip_l14", 224, 768, "", 303_966_976, (_timm("vit_large_patch14_clip_224.laion2b"),),
      PublisherPreprocessing("crop", 1.0, "bicubic"), license="mit",
      description="CLIP ViT-L/14 image tower, OpenCLIP on LAION-2B",
      image_text="laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),
    # --- EVA-02 (Fang et al. 2023): masked image modelling against EVA-CLIP features on ImageNet-21k (in22k) or
    #     Merged-38M (m38m), 224 px features; then fine-tuned on ImageNet-1k (Ti, S at 336 px; B, L at 448 px),
    #     directly or after an intermediate ImageNet-21k fine-tuning (timm's crop_mode squash for those). Parameter
    #     counts are timm's (vitlab also stores the zero key third of each q/k/v bias); MIT (timm's default_cfgs)
    *(E(f"eva02_{s}14.{tag}{'' if size == 224 else f'_{size}'}", f"eva02_{s}14", size, 0 if size == 224 else 1000,
        "" if size == 224 else IMAGENET_1K, params, (_timm(f"eva02_{long}_patch14_{size}.{tag}"),),
        PublisherPreprocessing("squash" if "in22k_in1k" in tag else "crop", 0.9 if size == 224 else 1.0, "bicubic",
                               CLIP_MEAN, CLIP_STD),
        license="mit", top1_timm=top1,
        description=f"EVA-02 {long.capitalize()}/14, MIM on {data}" + (
            " (features)" if size == 224 else f", fine-tuned on {'ImageNet-21k, then ' * ('in22k_in1k' in tag)}"
                                              f"ImageNet-1k at {size} px"))
      for s, long, tag, size, params, top1, data in (
          ("t", "tiny", "mim_in22k", 224, 5_502_144, None, "ImageNet-21k"),
          ("t", "tiny", "mim_in22k_ft_in1k", 336, 5_756_584, 80.630, "ImageNet-21k"),
          ("s", "small", "mim_in22k", 224, 21_621_120, None, "ImageNet-21k"),
          ("s", "small", "mim_in22k_ft_in1k", 336, 22_129_000, 85.716, "ImageNet-21k"),
          ("b", "base", "mim_in22k", 224, 85_758_720, None, "ImageNet-21k"),
          ("b", "base", "mim_in22k_ft_in1k", 448, 87_117_544, 88.250, "ImageNet-21k"),
          ("b", "base", "mim_in22k_ft_in22k_in1k", 448, 87_117_544, 88.692, "ImageNet-21k"),
          ("l", "large", "mim_in22k", 224, 303_268_800, None, "ImageNet-21k"),
          ("l", "large", "mim_m38m", 224, 303_268_800, None, "Merged-38M"),
          ("l", "large", "mim_in22k_ft_in1k", 448, 305_080_232, 89.624, "ImageNet-21k"),
          ("l", "large", "mim_m38m_ft_in1k", 448, 305_080_232, 89.570, "Merged-38M"),
          ("l", "large", "mim_in22k_ft_in22k_in1k", 448, 305_080_232, 89.966, "ImageNet-21k"),
          ("l", "large", "mim_m38m_ft_in22k_in1k", 448, 305_080_232, 90.052, "Merged-38M"))),
)
del E

# the tag ``create_model(model, pretrained=True)`` loads: the best ImageNet-1k weights with a downloadable
# publisher file, else the ImageNet-21k release (timm's default for vit_b16 is augreg2, which only timm publishes)
DEFAULT_TAGS: dict[str, str] = {
    "vit_ti16": "augreg_in21k_ft_in1k",
    "vit_s16": "augreg_in21k_ft_in1k",
    "vit_s32": "augreg_in21k_ft_in1k",
    "vit_b16": "augreg_in21k_ft_in1k",
    "vit_b32": "augreg_in21k_ft_in1k",
    "vit_l16": "augreg_in21k_ft_in1k",
    "vit_l32": "orig_in21k_ft_in1k_384",
    "vit_h14": "orig_in21k",
    "r50_vit_b16": "orig_in21k_ft_in1k_384",
    "r26_vit_b32": "orig_in21k",
    "r26_vit_s32": "augreg_in21k_ft_in1k",
    "r50_vit_l32": "augreg_in21k_ft_in1k",
    "r_vit_ti16": "augreg_in21k_ft_in1k",
    "bit_r50x1": "goog_in21k_ft_in1k_448",
    "deit_ti16": "fb_in1k",
    "deit_s16": "fb_in1k",
    "deit_b16": "fb_in1k",
    "deit_ti16_distilled": "fb_in1k",
    "deit_s16_distilled": "fb_in1k",
    "deit_b16_distilled": "fb_in1k",
    "deit3_s16": "fb_in22k_ft_in1k",
    "deit3_b16": "fb_in22k_ft_in1k",
    "deit3_l16": "fb_in22k_ft_in1k",
    **{f"dinov2_{s}14{reg}": "lvd142m" for s in "sblg" for reg in ("", "_reg4")},
    "siglip_b16": "webli",
    "siglip_l16": "webli",
    "siglip_so400m14": "webli",
    "clip_b32_quickgelu": "openai",
    "clip_b16_quickgelu": "openai",
    "clip_l14_quickgelu": "openai",
    "clip_b32": "laion2b",
    "clip_b16": "laion2b",
    "clip_l14": "laion2b",
    "eva02_t14": "mim_in22k_ft_in1k_336",
    "eva02_s14": "mim_in22k_ft_in1k_336",
    "eva02_b14": "mim_in22k_ft_in22k_in1k_448",
    "eva02_l14": "mim_m38m_ft_in22k_in1k_448",
}

_BY_NAME: dict[str, PretrainedEntry] = {e.name: e for e in CATALOG}


def list_pretrained(pattern: str | None = None) -> list[PretrainedEntry]:
    """Catalog entries, optionally those whose name contains ``pattern`` (or matches it as a glob)."""
    if not pattern:
        return list(CATALOG)
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [e for e in CATALOG if fnmatch.fnmatch(e.name, glob)]


FILE_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth", ".bin", ".ckpt", ".json", ".onnx", ".h5", ".msgpack")


def is_pretrained_name(name: str) -> bool:
    """Whether ``name`` looks like a catalog name (``model.tag``) rather than a path or URL (a checkpoint file
    suffix such as ``.safetensors`` makes it a path)."""
    return ("." in name and "/" not in name and "\\" not in name and ":" not in name and not name.startswith(".")
            and not name.lower().endswith(FILE_SUFFIXES))


def get_pretrained(name: str, tag: str | None = None) -> PretrainedEntry:
    """The entry for ``model.tag``, or for ``model`` with ``tag`` (``None``: the model's default tag). Model names
    may be any registered name or alias (``vit_base_patch16_384.augreg_in21k_ft_in1k`` finds
    ``vit_b16.augreg_in21k_ft_in1k_384``). Raises ``KeyError`` naming the closest entries."""
    model, _, given_tag = name.partition(".")
    tag = given_tag or tag
    try:
        reg, implied = resolve(model)
        model = reg.name
    except KeyError:
        implied = {}
    if tag is None:
        if model not in DEFAULT_TAGS:
            raise UnknownNameError(f"no pre-trained weights for {name!r}; models with weights: "
                                   f"{', '.join(DEFAULT_TAGS)}")
        tag = DEFAULT_TAGS[model]
    candidates = [f"{model}.{tag}"]
    size = implied.get("img_size")
    if size and size != 224 and not tag.endswith(f"_{size}"):
        candidates.insert(0, f"{model}.{tag}_{size}")  # a resolution alias picks the entry at that resolution
    for candidate in candidates:
        if candidate in _BY_NAME:
            return _BY_NAME[candidate]
    close = difflib.get_close_matches(candidates[-1], list(_BY_NAME), n=3, cutoff=0.5)
    if not close:
        close = [e for e in _BY_NAME if e.startswith(f"{model}.")][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `vitlab models --pretrained`"
    raise UnknownNameError(f"unknown pre-trained checkpoint {name if given_tag else candidates[-1]!r}{hint}")
