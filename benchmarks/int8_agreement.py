"""int8 against float32 on Fashion-MNIST: how many test predictions stay the same, and how fast each runs.

    PYTHONPATH=. nice -n 10 python benchmarks/int8_agreement.py CHECKPOINT [--model NAME] [--limit N] [--out FILE]
        [--int8-weights auto|signed|unsigned ...]

CHECKPOINT is any file ``vitlab.load`` reads (or a state dict with --model NAME). The model is exported to ONNX,
its Linear layers quantised to int8 by ONNX Runtime (vitlab.compute.deploy), and the 10,000 test images of
Fashion-MNIST are classified by PyTorch float32 and by the int8 model. Prints the share of equal predictions (target:
at least 99%), both accuracies and both throughputs, for each int8 weight type asked for (``--int8-weights signed
unsigned`` compares them on this CPU; default: auto, the type ``vitlab export-onnx --int8`` picks here).

Any image size works: the test images are resized to the model's. docs/performance.md measures the main job's model
and a ViT-S/16 trained briefly on Fashion-MNIST at 64 px (no pre-trained ViT-S/16 weights offline) this way:

    vitlab train --recipe fashion-mnist --model vit_s16 --img-size 64 --steps 120 --batch-size 32 --lr 5e-4 \
        --set patch_dropout=0 --run-name s16
    python benchmarks/int8_agreement.py runs/s16/model.safetensors --limit 1000
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitlab.atomic import write_text_atomic
from vitlab.cli.export_onnx import load_model
from vitlab.compute.deploy import WEIGHT_TYPES, OnnxModel, export_onnx, prediction_agreement, quantize_int8
from vitlab.preprocessing import Preprocessing

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array: magic (2 zero bytes, type 0x08 = uint8, number of dimensions), sizes."""
    data = gzip.open(path).read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def test_images(model, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test images as the model expects them (its preprocessing record, else the paper's [-1, 1])."""
    images = torch.from_numpy(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    if limit:
        images, labels = images[:limit], labels[:limit]
    cfg = model.cfg
    pre = getattr(model, "preprocessing", None) or Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    x = images.float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
    if tuple(x.shape[-2:]) != tuple(cfg.img_size):
        x = F.interpolate(x, size=cfg.img_size, mode="bilinear", antialias=True, align_corners=False)
    if cfg.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(), labels


def throughput(fn, x: torch.Tensor, batch: int = 256, rounds: int = 3) -> float:
    chunk = x[:batch]
    fn(chunk)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(chunk)
        best = min(best, time.perf_counter() - start)
    return len(chunk) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", help="model name, for a plain state dict")
    parser.add_argument("--model-args", default="{}", help="JSON of config overrides for --model, e.g. "
                        "'{\"embed_dim\": 64, \"num_heads\": 2, \"mlp_dim\": 128}'")
    parser.add_argument("--limit", type=int, help="only the first N test images")
    parser.add_argument("--out", help="also write the numbers as JSON")
    parser.add_argument("--int8-weights", nargs="+", choices=WEIGHT_TYPES, default=["auto"],
                        help="int8 weight type(s) to measure (default auto)")
    args = parser.parse_args()
    model = load_model(args.checkpoint, args.model, model_args=json.loads(args.model_args)).eval()
    x, labels = test_images(model, args.limit)
    reports = []
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx")
        fp32_speed = throughput(torch.inference_mode()(model), x)
        for weights in args.int8_weights:
            int8 = OnnxModel(quantize_int8(path, Path(folder) / f"model_int8_{weights}.onnx", weights=weights))
            with torch.inference_mode():
                result = prediction_agreement(model, int8, x)
            reports.append({
                "checkpoint": args.checkpoint,
                "int8_weights": int8.int8["weights"],
                "int8_chosen_for": int8.int8["chosen_for"],
                "images": len(x),
                "agreement": result["agreement"],
                "max_abs_logit_diff": result["max_abs_logit_diff"],
                "accuracy_fp32": float((result["reference_predictions"] == labels).float().mean()),
                "accuracy_int8": float((result["candidate_predictions"] == labels).float().mean()),
                "img_per_s_fp32_pytorch": fp32_speed,
                "img_per_s_int8": throughput(int8, x),
            })
    print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    for report in reports:
        verdict = "meets" if report["agreement"] >= 0.99 else "MISSES"
        print(f"int8 ({report['int8_weights']} weights) predictions equal to float32 on "
              f"{100 * report['agreement']:.2f}% of {len(x)} test images ({verdict} the 99% target)")
    if args.out:
        write_text_atomic(args.out, json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")


if __name__ == "__main__":
    main()
