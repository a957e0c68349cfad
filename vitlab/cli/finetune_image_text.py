"""``vitlab finetune-image-text --from MODEL --data CAPTIONS``: contrastive fine-tuning of a CLIP / SigLIP model on
captioned images (CLIP's softmax or SigLIP's sigmoid loss; LiT's locked image tower with --lock-image)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InvalidValueError
from .train import add_config_arguments, build_config, flags_in_errors, relaunch_with_torchrun

FLAGS = {"init_from": "--from"}  # this command's own flag for a config field


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune-image-text", help="fine-tune CLIP / SigLIP contrastively on captioned images (LiT / FLYP)",
        description="Fine-tune a two-tower image-text model (anything `vitlab zero-shot` reads: a transformers "
                    "CLIP / SigLIP folder or hf-hub: repo, OpenCLIP files, a big_vision .npz) on captioned images "
                    "(--data: a .csv / .jsonl manifest with a text column and a split column, or a Hugging Face "
                    "source with a text column) with the contrastive loss of its kind: CLIP's softmax over the "
                    "batch both ways, SigLIP's pairwise sigmoid (--loss auto picks by the model). One caption per "
                    "image per step; negatives are the other pairs of the process's micro-batch. Evaluates image "
                    "<-> text recall@1 on the held-out split (top1 = their mean). Starts from the 'image-text' "
                    "recipe; every `vitlab train` option applies. Writes <run>/image_text (a transformers folder "
                    "for zero-shot, eval --retrieval and serve --zero-shot) and the image tower alone as "
                    "<run>/model.safetensors. --resume needs the run's --lock-* flags (its checkpoints record them).")
    p.add_argument("--from", dest="source", metavar="MODEL", help="the image-text model to start from")
    p.add_argument("--lock-image", action="store_true",
                   help="keep the image tower (and its projection) as loaded: LiT (Zhai et al. 2022)")
    p.add_argument("--lock-text", action="store_true", help="keep the text tower as loaded")
    p.add_argument("--lock-logit-scale", action="store_true",
                   help="keep the logit scale (temperature) and SigLIP's logit bias as loaded")
    add_config_arguments(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its folder or a checkpoint; 'auto')")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = build_config(args, base_recipe="image-text")
    if args.source:
        config = config.replace(init_from=args.source)
    elif not args.resume:
        raise InvalidValueError("finetune-image-text: give --from MODEL (the CLIP / SigLIP model to fine-tune)")
    if args.dry_run:
        print(config.to_json())
        return 0
    if args.nproc and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args)
    from ..train.contrastive import ContrastiveObjective, finetune_image_text

    objective = ContrastiveObjective(args.lock_image, args.lock_text, args.lock_logit_scale)
    with flags_in_errors(FLAGS):
        result = finetune_image_text(config, objective=objective, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = result.metrics or {}
    if "top1" in m:
        print(f"held-out retrieval: image -> text R@1 {100 * m['image_to_text_r1']:.2f}%, text -> image R@1 "
              f"{100 * m['text_to_image_r1']:.2f}% (R@5 {100 * m['image_to_text_r5']:.2f}% / "
              f"{100 * m['text_to_image_r5']:.2f}%) on {m['samples']:,} images, {m['texts']:,} captions")
    else:
        print("no evaluation data: nothing measured (give the manifest a split column, or --val-data)")
    print(f"time: {result.train_seconds:.0f} s training; {result.steps} steps, {result.epochs:.2f} epochs")
    print(f"run folder: {result.run_dir}")
    if result.image_text is not None:
        print(f"image-text model: {result.image_text}")
        print(f"zero-shot: vitlab zero-shot {result.image_text} ...; retrieval: vitlab eval {result.image_text} "
              f"--retrieval --data {config.data}")
    sys.stdout.flush()
    return 0
