"""Images per second of `vitlab predict`'s library path on JPEG files: one image per call, the previous
implementation (all files decoded in the main process first, then forward passes of 32), and the batched one with
and without DataLoader workers, in one process, interleaved, best of ``--rounds``.

    PYTHONPATH=. nice -n 10 python benchmarks/predict_throughput.py [--model vit_s16] [--images 96] [--rounds 3]
        [--previous main]

``--previous REV`` reads the previous ``vitlab/train/predict.py`` from git revision REV (default: the parent of the
commit that rewrote it); the model has random weights (timing only).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vitlab
from vitlab.train.predict import file_inputs, iter_predictions

REWRITE = "vitlab predict: batched inference"  # the commit message that starts the rewrite


def previous_predict(rev: str | None):
    """``predict`` of vitlab/train/predict.py at git revision ``rev`` (None: before the batched rewrite)."""
    root = Path(__file__).resolve().parents[1]
    if rev is None:
        commit = subprocess.run(["git", "log", "--format=%H", f"--grep={REWRITE}", "-n", "1"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        rev = f"{commit}~1"
    source = subprocess.run(["git", "show", f"{rev}:vitlab/train/predict.py"], cwd=root, capture_output=True,
                            text=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "predict_previous.py"
    tmp.write_text(source)
    spec = importlib.util.spec_from_file_location("vitlab.train._predict_previous", tmp)  # its relative imports
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.predict


def make_images(folder: Path, n: int) -> list[str]:
    """``n`` 400x300 JPEG photos-like images (smooth colour plus noise, quality 90)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    files = []
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i) % 256, (xx + yy) % 256], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        files.append(str(folder / f"{i:04d}.jpg"))
        Image.fromarray(img).save(files[-1], quality=90)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--previous", help="git revision of the previous implementation (default: before the rewrite)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = vitlab.create_model(args.model).eval()
    pre = vitlab.metadata_of(model).preprocessing
    old = previous_predict(args.previous)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_images(Path(tmp), args.images)
        paths = {
            "one image per call (batch 1)": lambda: [old(model, [f], topk=5) for f in files],
            "previous: decode all, then batches of 32": lambda: old(model, files, topk=5),
            "batched: batch 64, 0 workers": lambda: list(iter_predictions(model, file_inputs(files, pre),
                                                                          batch_size=64)),
            "batched: batch 64, 2 workers": lambda: list(iter_predictions(model, file_inputs(files, pre),
                                                                          batch_size=64, num_workers=2)),
        }
        best = {name: float("inf") for name in paths}
        paths["one image per call (batch 1)"]()  # warm-up: first-call costs out of the numbers
        for _ in range(args.rounds):
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    base = best["one image per call (batch 1)"]
    print(f"{args.model}, {args.images} JPEG files 400x300, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    for name, seconds in best.items():
        print(f"  {name:44s} {args.images / seconds:7.1f} images/s  {base / seconds:5.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
