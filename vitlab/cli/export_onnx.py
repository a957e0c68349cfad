"""``vitlab export-onnx``: a model as ONNX (dynamic batch, optionally dynamic height and width), checked against
PyTorch, optionally int8 too."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compute.deploy import WEIGHT_TYPES, OnnxModel, check_parity, export_onnx, quantize_int8
from ..errors import InvalidValueError, VitlabError
from ..models import create_model, has_tokens, list_models


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-onnx", help="export a model to ONNX (and int8) with a parity check",
        description="Export a registered model (fresh weights, or --weights) or a checkpoint file to ONNX with a "
                    "dynamic batch axis, then run random inputs through PyTorch and ONNX Runtime and compare the "
                    "logits. --int8 also writes ONNX Runtime's dynamic int8 quantisation of the Linear layers.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``export-onnx``, which ``vitlab export`` shares (source, output, weights, int8, check)."""
    p.add_argument("source", help="registered model name, or a checkpoint file")
    p.add_argument("output", help="the file to write (.onnx)")
    p.add_argument("--model", help="model name for a checkpoint that does not store its architecture")
    p.add_argument("--weights", help="a state dict (.safetensors or torch.save) for the registered model in SOURCE")
    p.add_argument("--int8", metavar="FILE", help="also write the int8 model here")
    p.add_argument("--int8-weights", choices=WEIGHT_TYPES, default="auto",
                   help="int8 weight type: signed (fastest with VNNI / AMX), unsigned (exact on x86 CPUs without "
                        "VNNI, where signed weights saturate and lose accuracy), or auto (default: signed where "
                        "this CPU has VNNI or is not x86, else unsigned); quantise on the CPU kind that will run it")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference allowed (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic height and width too (a ViT; position embedding resampled in the graph); the check "
                        "then also runs two other sizes (default: on for models built with dynamic_img_size)")


def load_model(source: str, model_name: str | None = None, weights: str | None = None,
               model_args: dict | None = None):
    """A model from a registered name (optionally with a state dict) or from any checkpoint vitlab can read.
    ``model_args`` are config overrides for a plain state dict of a registered model with changed sizes."""
    from ..hub import is_checkpoint_name

    if Path(source).is_file() or is_checkpoint_name(source):  # a file, or a catalog name / hf-hub: repo / URL
        import vitlab

        loader = getattr(vitlab, "load", None)  # the checkpoints package: every supported format
        if loader is not None and not model_args:
            return loader(source, model_name=model_name)
        if not model_name:
            raise VitlabError(f"{source}: give --model NAME (this vitlab reads plain state dicts only)")
        return _with_state_dict(create_model(model_name, **(model_args or {})), source)
    if source not in list_models(aliases=True):
        raise VitlabError(f"{source!r} is neither a file nor a registered model; see `vitlab models`")
    model = create_model(source)
    return _with_state_dict(model, weights) if weights else model


def _with_state_dict(model, path: str):
    from ..checkpoints.files import read_safetensors, read_torch, sniff
    from ..checkpoints.loading import load_strict

    if not Path(path).is_file():
        raise VitlabError(f"--weights: no such file {path}")
    # the format is decided from the bytes, with the same size and pickle guards as every other reader
    kind = sniff(path)
    if kind not in ("safetensors", "torch-zip", "torch-legacy"):
        raise VitlabError(f"--weights {path}: a {kind}, not a state dict; give it as the checkpoint instead")
    state = read_safetensors(path)[0] if kind == "safetensors" else read_torch(path)
    if not isinstance(state, dict):
        raise VitlabError(f"{path}: expected a state dict, got {type(state).__name__}")
    load_strict(model, state, path)  # every missing, unexpected or mis-shaped tensor in one line
    return model


def other_sizes(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two input sizes besides the build size for checking a dynamic-size export: a larger non-square one and one
    with fewer rows (the position embedding shrinks along that axis)."""
    (H, W), (rh, rw) = model.cfg.img_size, model.cfg.reduction
    return (H + 2 * rh, W + rw), (H - rh if H > rh else H + rh, W + 2 * rw)


def check_and_report(model, exported, dynamic: bool, tolerance: float, kind: str) -> int:
    """Compare an exported model with ``model`` on random inputs (batch sizes, and other sizes when ``dynamic``),
    print the differences, and return the exit status: 1 when they exceed ``tolerance``."""
    sizes = other_sizes(model) if dynamic else ()
    parity = check_parity(model, exported, tolerance=tolerance, sizes=sizes)
    worst = max(parity.max_abs_diff.values())
    sizes = ", ".join(f"{'batch ' if isinstance(b, int) else ''}{b}: {d:.2e}"
                      for b, d in parity.max_abs_diff.items())
    print(f"parity with PyTorch: max |logit difference| {sizes} -> {'OK' if parity.ok else 'FAILED'} "
          f"(tolerance {tolerance:g}; largest |logit| {parity.max_abs_logit:.3g})")
    if parity.max_abs_logit == 0:
        print("note: every logit is 0 (a fresh model's head is zero-initialised), so the check compared zeros")
    if not parity.ok:
        print(f"error: {kind} output differs from PyTorch by {worst:.2e} > {tolerance:g}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.tolerance <= 0:
        raise InvalidValueError(f"--tolerance must be positive, got {args.tolerance}")
    if not args.output.endswith(".onnx") or (args.int8 and not args.int8.endswith(".onnx")):
        raise InvalidValueError("output files must end in .onnx")
    if args.int8_weights != "auto" and not args.int8:
        raise InvalidValueError("--int8-weights needs --int8 FILE")
    model = load_model(args.source, args.model, args.weights).eval()
    dynamic = args.dynamic_size or (has_tokens(model.cfg) and model.cfg.dynamic_img_size)
    path = export_onnx(model, args.output, dynamic_size=dynamic)
    shape = ("H", "W") if dynamic else model.cfg.img_size
    print(f"wrote {path} (input pixel_values (B, {', '.join(map(str, (model.cfg.in_chans, *shape)))}), "
          f"dynamic batch{', height and width' if dynamic else ''})")
    status = 0 if args.no_check else check_and_report(model, OnnxModel(path), dynamic, args.tolerance, "ONNX")
    if args.int8:
        int8_path = quantize_int8(path, args.int8, weights=args.int8_weights)
        int8 = OnnxModel(int8_path)
        parity = check_parity(model, int8, tolerance=float("inf"))
        chosen = int8.int8["weights"]
        reason = (f", chosen for this CPU ({'VNNI' if int8.int8['chosen_for']['vnni'] else 'no VNNI'})"
                  if args.int8_weights == "auto" else "")
        print(f"wrote {int8_path} (int8 Linear layers, {chosen} weights{reason}); max |logit difference| to float32: "
              f"{max(parity.max_abs_diff.values()):.3g} on random inputs (see benchmarks/int8_agreement.py for "
              "agreement on real data)")
    return status
