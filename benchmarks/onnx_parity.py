"""ONNX export parity for a registered model at full size (issue target: ViT-B/16 within 1e-4 of PyTorch).

    PYTHONPATH=. nice -n 10 python benchmarks/onnx_parity.py [vit_b16] [--tolerance 1e-4]

A fresh model has a zero head (the paper's init), which would compare zeros; the head is given N(0, 0.02) weights
first so that the logits are non-trivial. Random N(0, 1) images at batch 1 and 3 (the batch axis is dynamic).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitlab.compute.deploy import OnnxModel, check_parity, export_onnx
from vitlab.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="vit_b16")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    torch.nn.init.normal_(model.head.bias, std=0.02)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "model.onnx")
        seconds = time.perf_counter() - start
        parity = check_parity(model, OnnxModel(path), tolerance=args.tolerance)
        size_mb = path.stat().st_size / 2**20
    diffs = ", ".join(f"batch {b}: {d:.2e}" for b, d in parity.max_abs_diff.items())
    print(f"{args.model}: exported in {seconds:.0f} s ({size_mb:.0f} MB); max |logit difference| {diffs}; "
          f"largest |logit| {parity.max_abs_logit:.3g}; {'OK' if parity.ok else 'FAILED'} at {args.tolerance:g}")


if __name__ == "__main__":
    main()
