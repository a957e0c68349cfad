"""``vitlab eval CKPT --data ...``: top-1 / top-5 accuracy of a saved model on a data set."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1 / top-5 accuracy of a checkpoint on a data set",
                              description="Evaluate a checkpoint (any format vitlab.load reads) on a named set, an "
                                          "image folder or tar shards, with the model's own preprocessing. Exact "
                                          "under torchrun (each process takes a disjoint share).")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="named set, image folder or tar shards")
    p.add_argument("--split", default="test", help="split of a named set or folder tree (default test)")
    p.add_argument("--data-dir", help="folder holding a named set's files")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for folders and shards")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--img-size", type=int, help="evaluate at this resolution (position embeddings resampled)")
    p.add_argument("--on-bad-image", default="skip", choices=["skip", "fail"])
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..train import evaluate

    model = load(args.checkpoint, img_size=args.img_size)
    metrics = evaluate(model, args.data, args.split, data_dir=args.data_dir, batch_size=args.batch_size,
                       num_workers=args.workers, device=args.device, precision=args.precision,
                       on_bad_image=args.on_bad_image)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    line = f"{args.data} {args.split}: top-1 {100 * metrics['top1']:.2f}%"
    if "top5" in metrics:
        line += f", top-5 {100 * metrics['top5']:.2f}%"
    line += f", loss {metrics['loss']:.4f} on {metrics['samples']:,} images"
    if metrics["skipped"]:
        line += f" ({metrics['skipped']} unreadable skipped)"
    print(line)
    return 0
