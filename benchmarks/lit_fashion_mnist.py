"""LiT on Fashion-MNIST in small: a locked image tower trained on the labels, a text tower trained from scratch on
captions made from the class names, then zero-shot top-1 on the 10,000 test images with seen and held-out prompts.

    PYTHONPATH=. python benchmarks/lit_fashion_mnist.py prepare --out /tmp/lit          # captions + tokenizer
    vitlab train --recipe fashion-mnist --model clip_b16 --img-size 28 --set model_args.patch_size=4 \\
        --set model_args.embed_dim=64 --set model_args.depth=3 --set model_args.num_heads=2 \\
        --set model_args.mlp_dim=128 --epochs 3 --data-dir DIR --out-dir /tmp/lit/runs --run-name tower
    PYTHONPATH=. python benchmarks/lit_fashion_mnist.py assemble --out /tmp/lit        # tower + fresh text tower
    vitlab finetune-image-text --from /tmp/lit/start --data /tmp/lit/data/captions.csv --lock-image --lr 1e-3 \\
        --batch-size 256 --epochs 1 --set warmup_steps=20 --augment none --out-dir /tmp/lit/runs --run-name lit
    PYTHONPATH=. python benchmarks/lit_fashion_mnist.py zero-shot /tmp/lit/runs/lit/image_text --data-dir DIR

``prepare`` writes the Fashion-MNIST images (``DIR``: the idx files, e.g. Debian's dataset-fashion-mnist) as PNGs
with a captions manifest: each training image with five captions, one per training template and its class name
("a photo of a coat."), and the first 500 test images with one each (the run's held-out recall); a word-level
tokenizer is trained on the captions with the ``tokenizers`` library. ``assemble`` takes the trained tower's
pre-logits features (an identity projection, so the locked tower's representation is what the text tower must
match) and a 2-block CLIP text tower with fresh weights, and writes them as a transformers CLIPModel folder.
``zero-shot`` builds a classifier from the class names with the five training templates and with five held-out
ones (words the tokenizer never saw become its unknown token) and measures top-1 on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import torch

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TRAIN_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a grey photo of the {}.",
                   "a small picture of the {}."]
HELD_OUT_TEMPLATES = ["a blurry photo of a {}.", "a drawing of the {}.", "the {}.", "a {}.", "a photo of my {}."]
CONTEXT = 16


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def prepare(out: Path, data_dir: Path, train_images: int, test_images: int) -> None:
    from PIL import Image
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    root = out / "data"
    rows = []
    for split, prefix, keep in (("train", "train", train_images), ("test", "t10k", test_images)):
        images = _idx(data_dir / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:keep]
        labels = _idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz", 8)[:keep]
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            path = f"{split}/{i:05d}.png"
            Image.fromarray(image).save(root / path)
            name = CLASSES[label].lower()
            templates = TRAIN_TEMPLATES if split == "train" else TRAIN_TEMPLATES[:1]
            rows += [[path, t.format(name), split] for t in templates]
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r[1] for r in rows if r[2] == "train"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|endoftext|>"]))
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", eos)])
    (root / "tok").mkdir(exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>",
                                                                    "eos_token": "<|endoftext|>"}))
    print(f"{len(rows):,} captions, vocabulary of {tok.get_vocab_size()} tokens: {root / 'captions.csv'}")


def assemble(out: Path, tower: Path) -> None:
    import vitlab
    from vitlab.models.image_text import ImageTextModel
    from vitlab.models.text import TextConfig, TextTransformer
    from vitlab.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    visual = vitlab.load(tower)
    preprocessing, width = visual.preprocessing, visual.cfg.embed_dim
    visual.reset_head(width)
    with torch.no_grad():  # the pre-logits features as the embedding: an identity projection
        visual.head.weight.copy_(torch.eye(width))
        visual.head.bias.zero_()
    visual.preprocessing = preprocessing
    tokenizer = load_tokenizer(out / "data" / "tok", CONTEXT)
    vocab = len(json.loads((out / "data" / "tok" / "tokenizer.json").read_text())["model"]["vocab"])
    text = TextTransformer(TextConfig(vocab_size=vocab, context_length=CONTEXT, embed_dim=64, depth=2, num_heads=2,
                                      mlp_dim=128, proj_dim=width, eos_id=2, pad_id=0))
    model = ImageTextModel(visual, text, logit_scale=math.log(10), tokenizer=tokenizer)
    print(vitlab.save_image_text(model, out / "start"), out / "start")


def zero_shot(model: str, data_dir: str) -> None:
    from vitlab.train import evaluate
    from vitlab.zeroshot import zero_shot_classifier

    results = {}
    for name, templates in (("training templates", TRAIN_TEMPLATES), ("held-out templates", HELD_OUT_TEMPLATES)):
        classifier = zero_shot_classifier(model, [c.lower() for c in CLASSES], templates)
        classifier.class_names = CLASSES  # the data set's spelling, which evaluate compares
        results[name] = evaluate(classifier, "fashion-mnist", data_dir=data_dir)["top1"]
        print(f"zero-shot top-1, {name}: {100 * results[name]:.2f}% on 10,000 test images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    a.add_argument("--train-images", type=int, default=60000)
    a.add_argument("--test-images", type=int, default=500)
    b = sub.add_parser("assemble")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--tower", type=Path, help="default: OUT/runs/tower/model.safetensors")
    c = sub.add_parser("zero-shot")
    c.add_argument("model")
    c.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.data_dir, args.train_images, args.test_images)
    elif args.step == "assemble":
        assemble(args.out, args.tower or args.out / "runs" / "tower" / "model.safetensors")
    else:
        zero_shot(args.model, args.data_dir)


if __name__ == "__main__":
    main()
