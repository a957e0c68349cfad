"""``vitlab info CKPT``: what a checkpoint is (format, architecture, size, preprocessing, notable facts)."""

from __future__ import annotations

import argparse
import json
import warnings

from ..factory import inspect_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="describe a checkpoint file (any supported format)",
                              description="Read a checkpoint safely and describe it: format, architecture, parameter "
                                          "count, preprocessing and notable facts such as a zeroed head.")
    p.add_argument("checkpoint", help="a .safetensors, .npz or torch.save file, or a Hugging Face model folder")
    p.add_argument("--model", dest="model_name", help="registered model name, for layouts that do not store the "
                                                      "head count (timm, torchvision)")
    p.add_argument("--ema", action="store_true", help="describe the EMA weights of a training checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _pair(values) -> str:
    return "x".join(str(v) for v in values)


def format_info(info: dict) -> str:
    """The text ``vitlab info`` prints for an :func:`inspect_checkpoint` result."""
    a, pre, facts = info["architecture"], info["preprocessing"], info["facts"]
    named = f"{info['model']}, " if info["model"] else ""
    lines = [
        f"path:          {info['path']} ({info['file_bytes']:,} bytes)",
        f"format:        {info['format_title']} [{info['container']}]",
    ]
    if info["tokens"] is None:  # a convolutional baseline (BiT ResNet-v2): no patches, no tokens
        lines += [
            f"model:         {named}{_pair(a['img_size'])} px, convolutional",
            f"architecture:  ResNet-v2 stages {tuple(a['layers'])}, width x{a['width_factor']}, "
            f"{'pre-activation' if a['preact'] else 'post-activation'}, {a['in_chans']} input channels",
        ]
    else:
        backbone = a.get("backbone")
        hybrid = f"ResNet stages {tuple(backbone['layers'])} (width x{backbone['width_factor']}), " if backbone else ""
        lines += [
            f"model:         {named}{_pair(a['img_size'])} px, patch {_pair(a['patch_size'])}, grid "
            f"{_pair(info['grid'])}, {info['tokens']} tokens",
            f"architecture:  {hybrid}depth {a['depth']}, width {a['embed_dim']}, heads {a['num_heads']}, MLP "
            f"{a['mlp_dim']}, pool {a['pool']}{'' if a['class_token'] else ' (no class token)'}, pre-logits "
            f"{a['representation_size'] or 'none'}, GELU {a['gelu']}, LayerNorm eps {a['norm_eps']:g}, "
            f"{a['in_chans']} input channels",
        ]
        if info.get("options"):
            lines.append("options:       " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
    lines.append(f"parameters:    {info['params']:,} in {info['tensors']} tensors ({', '.join(info['dtypes'])})")
    names = info["class_names"]
    shown = "" if not names else ": " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    lines.append(f"classes:       {info['num_classes']}{shown if names else ' (no class names)'}")
    if pre["resize"] == "squash":
        resize = f"squash to {_pair(pre['img_size'])}"
    else:
        resize = f"resize to {_pair(pre['img_size'])} / {pre['crop_pct']:g}, centre crop {_pair(pre['img_size'])}"
    lines.append(f"preprocessing: {resize}, {pre['interpolation']}, mean {tuple(pre['mean'])}, std "
                 f"{tuple(pre['std'])} ({info['preprocessing_source']})")
    shown_facts = {k: v for k, v in facts.items() if v not in (None, False) and k not in ("pooling", "class_token",
                                                                                         "pre_logits")}
    if shown_facts:
        lines.append("facts:         " + ", ".join(f"{k}={v}" for k, v in shown_facts.items()))
    if info["metadata"]:
        lines.append("metadata:      " + json.dumps(info["metadata"])[:300])
    for note in info["notes"]:
        lines.append(f"note:          {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anything worth saying is in the notes
        info = inspect_checkpoint(args.checkpoint, model_name=args.model_name, prefer_ema=args.ema)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
