"""Named training recipes: the paper's (Tables 3 and 4, appendix B.1) and small-data ones, as plain dicts.

A recipe is a set of :class:`~vitlab.train.config.TrainConfig` fields on top of the defaults; anything can still be
changed with flags or ``--set key=value``. ``vitlab train --list-recipes`` lists them, ``--show-recipe NAME`` prints
the resolved config.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UnknownNameError
from .config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    values: dict

    def config(self, **overrides) -> TrainConfig:
        """The defaults, then this recipe, then ``overrides``."""
        return TrainConfig().replace(**{**self.values, **overrides})


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> None:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    TrainConfig().replace(**recipe.values)  # field names and types are checked now, not when a user picks it
    RECIPES[recipe.name] = recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown recipe {name!r}{hint} (see vitlab train --list-recipes)")
    return RECIPES[name]


def list_recipes() -> list[Recipe]:
    return list(RECIPES.values())


# Pre-training (paper section 4.1, Table 3): Adam 0.9 / 0.999, decoupled weight decay on the kernels, batch 4096,
# 10k warmup steps, linear decay, resolution 224, Inception crops and flips; the head has the pre-logits layer.
# Batch 4096 is reached by gradient accumulation over processes x accum_steps. The paper's three large-batch
# recipes (two pre-trainings, ImageNet from scratch) share these settings and differ in lr, decay and epochs.
PAPER_LARGE_BATCH = dict(model="vit_b16", img_size=224, optimizer="adamw", betas=(0.9, 0.999), warmup_steps=10_000,
                         batch_size=4096, accum_steps=16, grad_clip=1.0, augment="inception",
                         crop_scale=(0.05, 1.0), flip=True, precision="auto")
register_recipe(Recipe(
    "pretrain",
    "paper pre-training on JFT-300M-scale data (ViT-B/16: Adam, lr 8e-4, wd 0.1, 7 epochs, batch 4096, 10k "
    "warmup, linear decay, pre-logits head)",
    dict(PAPER_LARGE_BATCH, model_args={"representation_size": 768}, lr=8e-4, weight_decay=0.1, schedule="linear",
         end_lr_factor=0.0, epochs=7),
))
register_recipe(Recipe(
    "pretrain-i21k",
    "paper pre-training on ImageNet-21k (ViT-B/16: Adam, lr 1e-3 linear to 1e-5, wd 0.03, dropout 0.1, 90 epochs, "
    "batch 4096, 10k warmup, pre-logits head, sigmoid cross-entropy with the head bias at -10)",
    dict(PAPER_LARGE_BATCH, model_args={"representation_size": 768, "dropout": 0.1}, lr=1e-3, weight_decay=0.03,
         schedule="linear", end_lr_factor=0.01, epochs=90, loss="sigmoid"),
))
register_recipe(Recipe(
    "imagenet",
    "paper training from scratch on ImageNet (Table 3: Adam, lr 3e-3, cosine, wd 0.3, dropout 0.1, grad clip 1, "
    "300 epochs, batch 4096, 10k warmup)",
    dict(PAPER_LARGE_BATCH, model_args={"dropout": 0.1}, lr=3e-3, weight_decay=0.3, schedule="cosine", epochs=300),
))
# DeiT (Touvron et al. 2021, Table 9, DeiT-B): ImageNet-1k from scratch in 300 epochs without extra data, by strong
# augmentation and regularisation: AdamW at 5e-4 x batch / 512, cosine to 1e-5, 5 warmup epochs, label smoothing,
# stochastic depth 0.1, RandAugment (DeiT's is timm's m9 with magnitude noise 0.5; torchvision's has no noise),
# mixup 0.8 / cutmix 1.0, random erasing 0.25, repeated augmentation (3), no dropout, no gradient clipping, ImageNet
# crops of 8-100%. DeiT's distilled models add a teacher: --teacher (hard distillation, weight 0.5, the default).
register_recipe(Recipe(
    "deit",
    "DeiT's ImageNet training (Table 9, DeiT-B: AdamW lr 1e-3 = 5e-4 x batch / 512, wd 0.05, 300 epochs, batch 1024, "
    "5 warmup epochs, cosine to 1e-5, label smoothing 0.1, drop-path 0.1, RandAugment 2/9, mixup 0.8 / cutmix 1.0, "
    "random erasing 0.25, repeated augmentation 3; --teacher for DeiT's distillation)",
    dict(model="deit_b16", img_size=224, model_args={"drop_path_rate": 0.1}, optimizer="adamw", betas=(0.9, 0.999),
         lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=5, end_lr_factor=0.01, epochs=300,
         batch_size=1024, grad_clip=0.0, augment="crop", crop_scale=(0.08, 1.0), flip=True, randaugment=(2, 9),
         mixup=0.8, cutmix=1.0, label_smoothing=0.1, random_erasing=0.25, aug_repeats=3, precision="auto"),
))
# Masked autoencoder pre-training (He et al. 2022, Table 8, ViT-B): AdamW betas (0.9, 0.95), lr 1.5e-4 x batch / 256
# (2.4e-3 at 4096), wd 0.05, 800 epochs (1600 for the best numbers), 40 warmup epochs, cosine to 0, random resized
# crops of 20-100% and flips only (no label smoothing, mixup or drop-path: reconstruction has no labels). For
# `vitlab pretrain-mae`; the encoder is then fine-tuned with layer decay (0.65 for ViT-B in the paper).
register_recipe(Recipe(
    "mae",
    "masked autoencoder pre-training (He et al. 2022, ViT-B/16: AdamW lr 2.4e-3 = 1.5e-4 x batch / 256, betas "
    "0.9 / 0.95, wd 0.05, 800 epochs, batch 4096, 40 warmup epochs, cosine, crops 20-100% + flips; for "
    "vitlab pretrain-mae)",
    dict(model="vit_b16", img_size=224, optimizer="adamw", betas=(0.9, 0.95), lr=2.4e-3, weight_decay=0.05,
         schedule="cosine", warmup_epochs=40, end_lr_factor=0.0, epochs=800, batch_size=4096, accum_steps=16,
         grad_clip=0.0, augment="crop", crop_scale=(0.2, 1.0), flip=True, label_smoothing=0.0, precision="auto"),
))
register_recipe(Recipe(
    "mae-fashion-mnist",
    "a CPU-sized masked autoencoder pre-training of vit_fmnist on Fashion-MNIST (the paper's optimiser: AdamW "
    "betas 0.9 / 0.95, wd 0.05, cosine; lr 1.5e-3, batch 256, 10 epochs, warmup 1 epoch, flips only; "
    "the default of vitlab pretrain-mae)",
    dict(data="fashion-mnist", model="vit_fmnist", optimizer="adamw", betas=(0.9, 0.95), lr=1.5e-3,
         weight_decay=0.05, schedule="cosine", warmup_epochs=1, end_lr_factor=0.0, epochs=10, batch_size=256,
         grad_clip=0.0, augment="flip", flip=True, label_smoothing=0.0, eval_every_epochs=0, precision="fp32"),
))
# Fine-tuning (section 4.1, appendix B.1.1): SGD momentum 0.9, no weight decay, global-norm clip 1, cosine decay,
# batch 512, higher resolution (384) with the position embeddings resampled, a new zero-initialised head.
# Steps per dataset: ImageNet 20k, CIFAR 10k, Pets / Flowers 500, VTAB 2.5k; lr grid {0.001, 0.003, 0.01, 0.03}.
register_recipe(Recipe(
    "finetune",
    "paper fine-tuning (SGD momentum 0.9, no weight decay, clip 1, cosine, batch 512, 10k steps, lr 0.003, "
    "resolution 384, zero-initialised head; needs init_from)",
    dict(optimizer="sgd", momentum=0.9, lr=0.003, weight_decay=0.0, schedule="cosine", warmup_steps=500,
         steps=10_000, epochs=None, batch_size=512, grad_clip=1.0, img_size=384, reset_head="always",
         augment="inception", crop_scale=(0.05, 1.0), flip=True, precision="auto"),
))
register_recipe(Recipe(
    "finetune-cpu",
    "a CPU-sized fine-tune (SGD momentum 0.9, lr 0.01, 150 steps of 16 images at 160 px, clip 1, cosine, "
    "zero-initialised head; needs init_from): minutes for ViT-Ti/S on a laptop, not the paper's numbers",
    dict(optimizer="sgd", momentum=0.9, lr=0.01, weight_decay=0.0, schedule="cosine", warmup_steps=15,
         steps=150, epochs=None, batch_size=16, grad_clip=1.0, img_size=160, reset_head="always",
         augment="resize", flip=True, precision="auto"),
))
register_recipe(Recipe(
    "finetune-vtab",
    "paper VTAB-1k fine-tuning (SGD momentum 0.9, lr 0.01, 2,500 steps, batch 512, resolution 384, clip 1)",
    dict(optimizer="sgd", momentum=0.9, lr=0.01, weight_decay=0.0, schedule="cosine", warmup_steps=200,
         steps=2_500, epochs=None, batch_size=512, grad_clip=1.0, img_size=384, reset_head="always",
         augment="resize", flip=False, precision="auto"),
))
# Contrastive fine-tuning of CLIP / SigLIP on captioned images (vitlab finetune-image-text): AdamW with CLIP's betas
# 0.9 / 0.98 and weight decay 0.1 on the weight matrices, a small lr (1e-5, as FLYP's ImageNet fine-tuning of
# CLIP), cosine decay with warmup, light crops (OpenCLIP's training crops keep 90-100% of the image), no flips
# (captions may say left and right), evaluated every epoch.
register_recipe(Recipe(
    "image-text",
    "contrastive fine-tuning of CLIP / SigLIP on captioned images (AdamW lr 1e-5, betas 0.9 / 0.98, wd 0.1, "
    "cosine, warmup 50 steps, 5 epochs, batch 128, crops 90-100%, no flips; the default of vitlab "
    "finetune-image-text)",
    dict(optimizer="adamw", lr=1e-5, betas=(0.9, 0.98), weight_decay=0.1, schedule="cosine", warmup_steps=50,
         epochs=5, batch_size=128, grad_clip=1.0, augment="crop", crop_scale=(0.9, 1.0), flip=False,
         label_smoothing=0.0, eval_every_epochs=1.0, precision="auto"),
))
# Small data from scratch: ViTs lack the convolution's locality prior, so on tens of thousands of images they need
# strong regularisation and augmentation (RandAugment, mixup / cutmix, label smoothing, stochastic depth), small
# patches, AdamW with warmup and cosine decay, and weight averaging.
register_recipe(Recipe(
    "small-data",
    "ViT from scratch on a small data set such as CIFAR-10 (vit_cifar: AdamW lr 1e-3, wd 0.05, 200 epochs, "
    "warmup 10, cosine, RandAugment 2/9, mixup 0.8 / cutmix 1.0, label smoothing 0.1, drop-path 0.1, EMA)",
    dict(data="cifar10", model="vit_cifar", model_args={"drop_path_rate": 0.1}, optimizer="adamw", lr=1e-3,
         betas=(0.9, 0.999), weight_decay=0.05, schedule="cosine", warmup_epochs=10, epochs=200, batch_size=256,
         grad_clip=1.0, augment="crop", crop_scale=(0.35, 1.0), flip=True, randaugment=(2, 9), mixup=0.8,
         cutmix=1.0, label_smoothing=0.1, ema_decay=0.9998),
))
# The main job: Fashion-MNIST on a laptop-class CPU in minutes. Measured choices (docs/training.md): the registered
# vit_fmnist as it is (4x4 patches, 49 tokens, no class token: global average pooling, fixed 2D sin-cos position
# embeddings, a narrow model: width 96, three heads of 32, MLP 192, depth 4), Muon for the blocks' matrices and AdamW
# for the rest (twice AdamW's accuracy per epoch here: 20 epochs reach what AdamW reached in 40), batch 256 (hides
# Muon's fixed cost per step; as accurate as 128 with Muon), a short warmup and cosine decay, label smoothing, half
# of each image's patch tokens dropped in training, left-right flips only (the model underfits in this budget, so
# stronger augmentation costs accuracy), data held in memory as one uint8 tensor and augmented per batch.
register_recipe(Recipe(
    "fashion-mnist",
    "the main job: a 0.3M-parameter ViT (width 96, depth 4, 4x4 patches, sin-cos position embedding, global average "
    "pooling) on Fashion-MNIST in about 8-10 minutes of training on two CPU cores: Muon + AdamW lr 5.6e-3, "
    "wd 0.1, 20 epochs, batch 256, warmup 0.5 epoch, cosine, label smoothing 0.1, flips, half the patch tokens "
    "dropped per training image",
    dict(data="fashion-mnist", model="vit_fmnist", optimizer="muon", lr=5.6e-3, betas=(0.9, 0.999),
         weight_decay=0.1, schedule="cosine", warmup_epochs=0.5, epochs=20, batch_size=256, grad_clip=1.0,
         augment="flip", flip=True, label_smoothing=0.1, patch_dropout=0.5, eval_every_epochs=0, precision="fp32"),
))
