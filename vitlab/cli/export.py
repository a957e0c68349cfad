"""``vitlab export``: a model as a deployment file, ONNX (``export-onnx``'s format) or a PyTorch ``.pt2`` package
(torch.export + AOTInductor), with a dynamic batch (and height and width for dynamic-size models), checked against
PyTorch."""

from __future__ import annotations

import argparse

from ..compute.pt2 import Pt2Classifier, export_pt2
from ..devices import resolve_device
from ..errors import InvalidValueError
from . import export_onnx

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX or a PyTorch .pt2 package with a parity check",
        description="Export a registered model (fresh weights, or --weights) or a checkpoint file as ONNX (as "
                    "`vitlab export-onnx`) or as a .pt2 package (torch.export compiled ahead of time by AOTInductor, "
                    "for the CPU or a CUDA GPU; runs with plain PyTorch), with a dynamic batch axis, the model's "
                    "config, preprocessing and class names inside, and a parity check against PyTorch.")
    export_onnx.add_arguments(p)
    p.add_argument("--format", choices=sorted(set(FORMATS.values())),
                   help="onnx or pt2 (default: from OUTPUT's suffix, .onnx or .pt2)")
    p.add_argument("--device", default="cpu",
                   help="pt2: the device the package is compiled for, cpu (default) or cuda[:N] (needs the CUDA "
                        "toolkit); the package then runs only there")
    p.set_defaults(func=run)


def output_format(output: str, requested: str | None) -> str:
    """The format to write: ``requested``, else the one OUTPUT's suffix names; OUTPUT's suffix must match it."""
    suffix = next((s for s in FORMATS if output.lower().endswith(s)), None)
    if requested is None:
        if suffix is None:
            raise InvalidValueError(f"{output}: give --format (onnx or pt2) or an output ending in .onnx or .pt2")
        return FORMATS[suffix]
    if suffix is None or FORMATS[suffix] != requested:
        wanted = next(s for s, f in FORMATS.items() if f == requested)
        raise InvalidValueError(f"--format {requested} writes a {wanted} file; {output} does not end in {wanted}")
    return requested


def run(args: argparse.Namespace) -> int:
    fmt = output_format(args.output, args.format)
    if fmt == "onnx":
        if args.device != "cpu":
            raise InvalidValueError("--device is for --format pt2 (ONNX files run on ONNX Runtime's CPU provider)")
        return export_onnx.run(args)
    if args.int8 or args.int8_weights != "auto":
        raise InvalidValueError("--int8 and --int8-weights are for ONNX (--format onnx)")
    if args.tolerance <= 0:
        raise InvalidValueError(f"--tolerance must be positive, got {args.tolerance}")
    device = resolve_device(args.device)
    model = export_onnx.load_model(args.source, args.model, args.weights).eval()
    dynamic = args.dynamic_size or bool(getattr(model.cfg, "dynamic_img_size", False))
    print(f"compiling {args.output} for {device} with AOTInductor (a C++ compiler builds the kernels: tens of "
          "seconds)", flush=True)
    path = export_pt2(model, args.output, dynamic_size=dynamic, device=device)
    shape = ("H", "W") if dynamic else model.cfg.img_size
    print(f"wrote {path} (input (B, {', '.join(map(str, (model.cfg.in_chans, *shape)))}) float32 on {device}, "
          f"dynamic batch{', height and width' if dynamic else ''}; load with torch._inductor.aoti_load_package)")
    if args.no_check:
        return 0
    return export_onnx.check_and_report(model, Pt2Classifier(path), dynamic, args.tolerance, "the .pt2 package's")
