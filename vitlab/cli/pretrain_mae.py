"""``vitlab pretrain-mae``: masked autoencoder pre-training (He et al. 2022), self-supervised."""

from __future__ import annotations

import argparse

from ..errors import InvalidValueError
from .train import add_config_arguments, build_config, flags_in_errors, print_pretraining_result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain-mae", help="masked autoencoder pre-training (self-supervised)",
        description="Pre-train a ViT as a masked autoencoder (He et al. 2022): 75%% of each image's patches are "
                    "dropped, the ViT encodes the rest, a light decoder reconstructs the pixels of the dropped "
                    "patches (mean squared error, per-patch normalised targets). Same options as `vitlab train` "
                    "(labels are not used; --recipe mae is the paper's ViT-B recipe). Writes the ViT encoder to "
                    "<run>/model.safetensors; fine-tune it with `vitlab finetune --from` (the paper uses "
                    "--layer-decay 0.65-0.75).")
    add_config_arguments(p)
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches dropped (default 0.75)")
    p.add_argument("--decoder-width", type=int, help="decoder width (default 512, or the encoder's below 512)")
    p.add_argument("--decoder-depth", type=int, help="decoder blocks (default 8, or 2 for encoders below width 512)")
    p.add_argument("--decoder-heads", type=int, help="decoder heads (default 16, or the encoder's below width 512)")
    p.add_argument("--no-norm-pix-loss", action="store_true",
                   help="reconstruct raw (normalised-image) pixels instead of per-patch normalised ones")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted pre-training run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..selfsup.pretrain import MaskedAutoencoderObjective, pretrain_mae

    if not 0 < args.mask_ratio < 1:
        raise InvalidValueError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    for flag in ("decoder_width", "decoder_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InvalidValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.decoder_depth is not None and args.decoder_depth < 0:
        raise InvalidValueError(f"--decoder-depth must be at least 0, got {args.decoder_depth}")
    if getattr(args, "nproc", None):
        raise InvalidValueError("--nproc is not supported by pretrain-mae; use torchrun -m vitlab pretrain-mae ...")
    config = build_config(args, base_recipe="mae-fashion-mnist")
    objective = MaskedAutoencoderObjective(args.mask_ratio, args.decoder_width, args.decoder_depth,
                                           args.decoder_heads, norm_pix_loss=not args.no_norm_pix_loss)
    with flags_in_errors():
        result = pretrain_mae(config, objective=objective, resume=args.resume)
    return print_pretraining_result(result, config.data, lambda m: (
        f"masked autoencoder: held-out reconstruction loss {m['loss']:.4f} per masked patch on "
        f"{m['patches']:,} masked patches ({result.steps} steps, {result.train_seconds:.0f} s)"))
