"""``vitlab pretrain-mpp``: self-supervised masked patch prediction pre-training (paper section 4.6)."""

from __future__ import annotations

import argparse

from ..errors import InvalidValueError
from .train import add_config_arguments, build_config, flags_in_errors, print_pretraining_result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain-mpp", help="masked patch prediction pre-training (self-supervised)",
        description="Pre-train a ViT by masked patch prediction (paper section 4.6): half of the patch embeddings "
                    "are corrupted (80%% [mask], 10%% another patch, 10%% kept) and the model predicts each "
                    "corrupted patch's 3-bit mean colour. Same options as `vitlab train` (labels are not used). "
                    "Writes the ViT to <run>/model.safetensors; fine-tune it with `vitlab finetune` or "
                    "`vitlab train --set init_from=...`.")
    add_config_arguments(p)
    p.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches corrupted (default 0.5)")
    p.add_argument("--mask-probs", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("MASK", "RANDOM", "KEEP"),
                   help="how corrupted patches are corrupted (default 0.8 0.1 0.1)")
    p.add_argument("--bits", type=int, default=3, help="bits per colour channel of the targets (default 3: 512 "
                                                       "colours for RGB)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted pre-training run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..selfsup.pretrain import MaskedPatchObjective, pretrain_mpp

    if not 0 < args.mask_ratio <= 1:
        raise InvalidValueError(f"--mask-ratio must be in (0, 1], got {args.mask_ratio}")
    if args.bits < 1 or args.bits > 8:
        raise InvalidValueError(f"--bits must be between 1 and 8, got {args.bits}")
    if getattr(args, "nproc", None):
        raise InvalidValueError("--nproc is not supported by pretrain-mpp; use torchrun -m vitlab pretrain-mpp ...")
    config = build_config(args, base_recipe="fashion-mnist")
    if not any(a.strip().startswith("patch_dropout") for a in args.assignments):
        config = config.replace(patch_dropout=0.0)  # the recipe's patch dropout: MPP predicts from every patch
    objective = MaskedPatchObjective(args.bits, args.mask_ratio, tuple(args.mask_probs))
    with flags_in_errors():
        result = pretrain_mpp(config, objective=objective, resume=args.resume)
    return print_pretraining_result(result, config.data, lambda m: (
        f"masked patch prediction: held-out loss {m['loss']:.4f}, colour accuracy {m['top1']:.4f} on "
        f"{m['patches']:,} corrupted patches ({result.steps} steps, {result.train_seconds:.0f} s)"))
