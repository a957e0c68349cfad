"""A linear segmentation probe on multi-layer ViT features (docs/backbone.md's worked example), on Fashion-MNIST.

    PYTHONPATH=. nice -n 10 python benchmarks/segmentation_probe.py runs/<run>/model.safetensors \\
        [--blocks -4 -3 -2 -1] [--img-size 28 56] [--steps 200] [--threads 1]

The task: label every pixel of a Fashion-MNIST test image with its garment class, or background (11 classes; a
pixel is foreground when its grey value is at least 25). The backbone is frozen: ``FeatureExtractor`` gives the
NCHW maps of the chosen blocks (final LayerNorm applied), they are concatenated on the channel axis, a 1x1
convolution maps them to 11 logits per token and bilinear upsampling brings the logits to the pixels (the linear
decoder of Segmenter / DPT-style probes). Only the 1x1 convolution is trained (Adam, cross-entropy per pixel).
``--img-size`` adds runs of the backbone at other input sizes (images resized, position embedding resampled at run
time): a finer token grid. Prints pixel accuracy and mean IoU over the 11 classes on 2,000 test images for the
checkpoint with the chosen blocks, with the last block alone and, as a control, for the same architecture with
random weights.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.data.arrays import load_fashion_mnist
from vitlab.models import FeatureExtractor

FOREGROUND = 25  # grey level (0..255) from which a pixel belongs to the garment


def pixel_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8, (N,) -> (N, H, W) int64: 0 background, 1 + class on the garment."""
    return torch.where(images[:, 0] >= FOREGROUND, labels[:, None, None] + 1, 0)


class LinearSegmenter(nn.Module):
    """Frozen multi-layer features -> 1x1 convolution -> bilinear upsampling to the input's pixels."""

    def __init__(self, backbone: FeatureExtractor, num_classes: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = nn.Conv2d(sum(backbone.feature_info.channels()), num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        with torch.no_grad():
            maps = self.backbone(x)  # list of (B, D, gh, gw)
        logits = self.head(torch.cat(maps, dim=1))  # (B, classes, gh, gw)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


def scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Pixel accuracy and mean intersection-over-union over the classes present."""
    confusion = torch.bincount(target.flatten() * num_classes + pred.flatten(), minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float(inter.sum() / confusion.sum()), float((inter[present] / union[present]).mean())


def run_probe(model: nn.Module, blocks: list[int], img_size: int, steps: int, train, test, seed: int = 0) -> dict:
    preprocessing = model.preprocessing
    mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)

    def inputs(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if img_size != x.shape[-1]:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        return (x - mean) / std

    model.set_dynamic_img_size(img_size != model.cfg.img_size[0])
    probe = LinearSegmenter(FeatureExtractor(model, indices=blocks, norm=True), num_classes=11)
    opt = torch.optim.Adam(probe.head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(train.images.shape[-2:])
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(train), (128,), generator=gen)
        target = pixel_labels(train.images[idx], train.labels[idx])
        loss = F.cross_entropy(probe(inputs(train.images[idx]), size), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    preds, targets = [], []
    with torch.no_grad():
        for i in range(0, len(test), 500):
            images, labels = test.images[i:i + 500], test.labels[i:i + 500]
            preds.append(probe(inputs(images), size).argmax(1))
            targets.append(pixel_labels(images, labels))
    acc, miou = scores(torch.cat(preds), torch.cat(targets), 11)
    return {"pixel_accuracy": acc, "mean_iou": miou, "seconds": time.perf_counter() - start,
            "channels": sum(probe.backbone.feature_info.channels()), "grid": img_size // model.cfg.patch_size[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--blocks", type=int, nargs="+", default=[-4, -3, -2, -1])
    parser.add_argument("--img-size", type=int, nargs="+", default=[28])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = load_fashion_mnist("train")
    train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.train_images])
    test = load_fashion_mnist("test").subset(range(args.test_images))
    trained = vitlab.load(args.checkpoint)
    random = vitlab.models.model_from_config(trained.cfg)
    random.preprocessing = trained.preprocessing
    native = trained.cfg.img_size[0]
    runs = [("checkpoint", trained, args.blocks, native), ("checkpoint", trained, [-1], native),
            ("random weights", random, args.blocks, native)]
    runs += [("checkpoint", trained, args.blocks, size) for size in args.img_size if size != native]
    for name, model, blocks, img_size in runs:
        r = run_probe(copy.deepcopy(model).eval(), blocks, img_size, args.steps, train, test)
        print(f"{name:15s} blocks {str(blocks):18s} input {img_size}px (grid {r['grid']}x{r['grid']}, "
              f"{r['channels']} channels): pixel accuracy {100 * r['pixel_accuracy']:.2f}%, "
              f"mIoU {100 * r['mean_iou']:.2f}% ({r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
