"""``vitlab finetune --from CKPT``: fine-tune a saved model (any format ``vitlab.load`` reads) on new data, the
paper's way by default (SGD momentum, no weight decay, clip 1, cosine; higher resolution with resampled position
embeddings; a new zero-initialised head when the classes change)."""

from __future__ import annotations

import argparse
import os
import sys

from ..train.config import RULES, describe
from .train import add_config_arguments, build_config, flags_in_errors, relaunch_with_torchrun, report

FLAGS = {"init_from": "--from", "reset_head": "--reset-head"}  # this command's own flags for config fields


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint on new data (paper recipe by default)",
        description="Fine-tune a checkpoint (vitlab .safetensors, timm / HF / torchvision state dicts, Google .npz, "
                    "a run's .pt) with the 'finetune' recipe unless --recipe or --config says otherwise. "
                    "--img-size sets the new resolution (position embeddings are resampled).")
    p.add_argument("--from", dest="source", required=True, metavar="CKPT", help="the checkpoint to start from")
    p.add_argument("--reset-head", choices=RULES["reset_head"].choices, help=describe("reset_head"))
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = build_config(args, base_recipe="finetune").replace(init_from=args.source)
    if args.reset_head:
        config = config.replace(reset_head=args.reset_head)
    if args.dry_run:
        print(config.to_json())
        return 0
    if args.nproc and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args)
    from ..train import train

    with flags_in_errors(FLAGS):
        result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        report(result)
        sys.stdout.flush()
    return 0
