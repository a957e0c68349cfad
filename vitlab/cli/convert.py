"""``vitlab convert SRC DST --to FORMAT``: any supported checkpoint to vitlab, npz, timm, HF or torchvision layout."""

from __future__ import annotations

import argparse
import json
import warnings

from ..checkpoints import EXPORT_FORMATS, RESAMPLE_METHODS
from ..checkpoints.adapter import is_adapter_file
from ..errors import InvalidValueError
from ..factory import convert


def _size(text: str) -> int | tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a checkpoint to another layout (optionally new size/classes)",
                              description="Read any supported checkpoint and write it as a vitlab .safetensors, a "
                                          "vit_jax .npz, a timm or torchvision state dict (.safetensors or .pth) or "
                                          "a Hugging Face folder. Nothing is written unless the conversion succeeds.")
    p.add_argument("src", help="source checkpoint (file or Hugging Face folder)")
    p.add_argument("dst", help="destination file (or folder for --to hf)")
    p.add_argument("--to", choices=EXPORT_FORMATS, help="target layout (default with --merge-lora: vitlab)")
    p.add_argument("--merge-lora", action="store_true",
                   help="SRC is a LoRA / DoRA adapter file: merge it into its base (found by the name and sha256 it "
                        "records) and write the merged model")
    p.add_argument("--img-size", type=_size, help="new resolution, N or HxW (position embedding resampled)")
    p.add_argument("--patch-size", type=_size, help="new patch size, N or HxW: the patch-embedding kernel resampled "
                                                    "as FlexiViT does, the position embedding to the new grid")
    p.add_argument("--num-classes", type=int, help="new class count: a new zero-initialised head")
    p.add_argument("--drop-pre-logits", action="store_true", help="remove the pre-logits layer (new head)")
    p.add_argument("--resample", choices=RESAMPLE_METHODS,
                   help="position-embedding resampling (default: bilinear_aligned for npz, bicubic otherwise)")
    p.add_argument("--model", dest="model_name", help="registered model name, for layouts that do not store the "
                                                      "head count; a resolution alias also sets --img-size")
    p.add_argument("--gelu", choices=("exact", "tanh"), help="GELU flavour (default: the source's)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights of a training checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.merge_lora and not is_adapter_file(args.src):
        raise InvalidValueError(f"--merge-lora {args.src}: not a LoRA adapter file (a run's adapter.safetensors)")
    if args.to is None and not args.merge_lora:
        raise InvalidValueError("convert: give the target layout with --to (" + ", ".join(EXPORT_FORMATS) + ")")
    args.to = args.to or "vitlab"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anything worth saying is in the notes
        summary = convert(args.src, args.dst, to=args.to, img_size=args.img_size, num_classes=args.num_classes,
                          model_name=args.model_name, resample=args.resample, drop_pre_logits=args.drop_pre_logits,
                          gelu=args.gelu, prefer_ema=args.ema, patch_size=args.patch_size)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    cfg = summary["config"]
    size = "x".join(map(str, cfg["img_size"]))
    print(f"wrote {summary['dst']} ({summary['to']}) from {summary['src']} ({summary['from']}): "
          f"{size} px, {cfg['num_classes']} classes, {summary['params']:,} parameters"
          + (f", patch {'x'.join(map(str, cfg['patch_size']))}" if args.patch_size else "")
          + ((", position embedding resampled" if "pos_embed" in cfg else ", new resolution")  # BiT: none
             if summary["resampled"] else "")
          + ((", new zero-initialised head" if cfg["num_classes"] else ", head removed (features)")
             if summary["new_head"] else ""))
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0
