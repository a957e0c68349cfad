"""``vitlab predict CKPT IMAGES... | --data SOURCE``: top-k classes (or pooled features, or an image-text model's
joint-space embeddings) for image files, folders or a data source, in batches; a bad image gets its own error line
(or row). ``--texts FILE``: an image-text model's embeddings of texts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidValueError
from ._merging import ALIASES, add_merge_tokens_argument
from ._zeroshot import ALIASES as ZERO_SHOT_ALIASES
from ._zeroshot import add_class_arguments, add_template_arguments, class_names_of, templates_of
from .train import EVAL_DATA_FLAGS, add_hf_data_arguments, flags_in_errors, hf_data

# library arguments that errors name -> this command's flags
FLAGS = {**EVAL_DATA_FLAGS, "out": "--out", "batch_size": "--batch-size", "num_workers": "--workers",
         "precision": "--precision", **ALIASES, **ZERO_SHOT_ALIASES}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k classes or features of image files, folders or a data set",
                              description="Predict the top-k classes of images with a checkpoint's own "
                                          "preprocessing and class names, in batches: image files, folders (their "
                                          "images at any depth, sorted) or a data source (--data). Prints one line "
                                          "per image, or writes a CSV / JSONL / parquet table with --out; "
                                          "--features writes the pooled pre-logits features instead. Unreadable "
                                          "images get an error line (row); the others are still predicted (exit "
                                          "status 1 if any failed).")
    p.add_argument("checkpoint", help="any checkpoint vitlab.load reads, or an .onnx / .pt2 file from `vitlab export`; "
                                      "with --classes an image-text model (CLIP, SigLIP: zero-shot)")
    p.add_argument("images", nargs="*", help="image files and folders")
    p.add_argument("--data", help="instead of IMAGES: a .csv / .jsonl manifest, an image-folder tree, tar shards, a "
                                  "Hugging Face source (hf:org/name, save_to_disk folder, parquet / arrow files) or a "
                                  "named set")
    add_hf_data_arguments(p)
    p.add_argument("--split", default="test", help="split of --data's named set or folder tree (default test)")
    p.add_argument("--data-dir", help="folder holding a named set's files")
    p.add_argument("--topk", type=int, help="classes listed per image (default 5, or all of a model with fewer)")
    p.add_argument("--out", type=Path, help="write the predictions to this file instead of printing: .csv, .jsonl "
                                            "or .parquet (with --features: .safetensors, .npz or .parquet); an "
                                            "existing file is refused")
    p.add_argument("--features", action="store_true",
                   help="write each image's pooled pre-logits features (what the head reads) to --out instead of "
                        "classes")
    p.add_argument("--joint", action="store_true",
                   help="CHECKPOINT is an image-text model (CLIP, SigLIP): write each image's joint-space unit "
                        "embedding (what its text embeddings are compared with) to --out; implies --features")
    p.add_argument("--texts", type=Path, metavar="FILE",
                   help="instead of images: CHECKPOINT is an image-text model; write the joint-space unit embeddings "
                        "of these texts (a text file, one per line, or a .csv / .jsonl manifest's text column) to "
                        "--out")
    p.add_argument("--text-column", help="with --texts: the manifest's text column (default: text, caption or "
                                         "captions)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding the images (default 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or bf16 / fp16 autocast (fp16: for GPUs without bf16)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    add_class_arguments(p, "zero-shot: CHECKPOINT is an image-text model (CLIP, SigLIP) and these are the classes "
                           "(docs/zero-shot.md); ")
    add_template_arguments(p)
    add_merge_tokens_argument(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or out-of-range options before the model is loaded."""
    if args.batch_size < 1:
        raise InvalidValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.texts is not None:
        if args.images or args.data:
            raise InvalidValueError("--texts embeds texts; give it without image files / folders or --data")
        refused = [flag for flag, given in (("--classes", args.classes), ("--classes-file", args.classes_file),
                                             ("--template", args.template), ("--prompt-ensemble", args.prompt_ensemble),
                                             ("--topk", args.topk), ("--merge-tokens", args.merge_tokens),
                                             ("--json", args.json)) if given]
        if refused:
            raise InvalidValueError(f"--texts writes text embeddings to --out; drop {', '.join(refused)}")
        if args.out is None:
            raise InvalidValueError("--texts writes a file: give --out FILE (.safetensors, .npz or .parquet)")
        return
    if args.text_column:
        raise InvalidValueError("--text-column names the texts of a --texts manifest; add --texts")
    if bool(args.images) == bool(args.data):
        raise InvalidValueError("give image files / folders or --data SOURCE (one of the two)")
    if args.joint:
        zero_shot = args.classes is not None or args.classes_file is not None
        if zero_shot or args.template or args.prompt_ensemble or args.topk is not None:
            raise InvalidValueError("--joint writes embeddings; drop the classification options (--classes, "
                                    "--classes-file, --template, --prompt-ensemble, --topk)")
        if args.out is None:
            raise InvalidValueError("--joint writes a file: give --out FILE (.safetensors, .npz or .parquet)")
        args.features = True
    if args.topk is not None and args.topk < 1:
        raise InvalidValueError(f"--topk must be at least 1, got {args.topk}")
    if args.workers < 0:
        raise InvalidValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.features and args.out is None:
        raise InvalidValueError("--features writes a file: give --out FILE (.safetensors, .npz or .parquet)")
    if args.features and args.topk is not None:
        raise InvalidValueError("--topk is for classes; --features writes features")
    if args.json and args.out is not None:
        raise InvalidValueError("--json prints; with --out the file's extension picks the format")
    zero_shot = args.classes is not None or args.classes_file is not None
    if (args.template or args.prompt_ensemble) and not zero_shot:
        raise InvalidValueError("--template / --prompt-ensemble choose the prompts of zero-shot classes; give "
                                "--classes or --classes-file")


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..compute.onednn import linear_shapes
    from ..compute.precision import choose_cpu_precision
    from ..compute.pt2 import is_exported_file, load_exported
    from ..compute.tome import merge_tokens
    from ..devices import resolve_device
    from ..models import metadata_of
    from ..train.predict import data_inputs, file_inputs, image_files, iter_predictions
    from ..train.predict_files import check_output, write_features, write_predictions

    check_args(args)
    if args.out is not None:  # an existing file, a wrong extension: said now, not after the model is loaded
        check_output(args.out, args.features or args.texts is not None)
    if args.texts is not None:
        return _write_texts(args)
    files = image_files(args.images) if args.images else None
    data = hf_data(args.data, args)
    if args.joint and data is not None:  # a captions manifest: each distinct image once, not once per caption
        from ..data import SPLIT_FOLDERS
        from ..data.captions import captioned_files

        with flags_in_errors(FLAGS, config_flags=False):
            files = captioned_files(data, SPLIT_FOLDERS.get(args.split, (args.split,)))
    device = resolve_device(args.device)
    names = class_names_of(args, required=False)
    if args.joint:  # the image tower with its projection and L2 norm: joint-space unit embeddings out
        from .. import load_image_text
        from ..zeroshot import image_embedder

        model = image_embedder(load_image_text(args.checkpoint).to(device))
    elif names is not None:  # zero-shot: the image-text model's classifier of these classes
        from .. import load_image_text
        from ..zeroshot import zero_shot_classifier

        with flags_in_errors(FLAGS, config_flags=False):
            model = zero_shot_classifier(load_image_text(args.checkpoint).to(device), names, templates_of(args))
    else:
        model = load_exported(args.checkpoint) if is_exported_file(args.checkpoint) else load(args.checkpoint)
    if args.merge_tokens:
        with flags_in_errors(FLAGS, config_flags=False):
            merge_tokens(model, args.merge_tokens)
    precision = args.precision
    if device.type == "cpu" and precision != "fp32" and not is_exported_file(args.checkpoint):
        precision = choose_cpu_precision(precision, linear_shapes(model, min_features=0))  # warns if emulated
    pre = metadata_of(model).preprocessing
    topk = args.topk or 5
    with flags_in_errors(FLAGS, config_flags=False):
        inputs = file_inputs(files, pre) if files is not None else data_inputs(data, args.split, pre,
                                                                               data_dir=args.data_dir)
        predictions = iter_predictions(model, inputs, topk=topk, features=args.features, batch_size=args.batch_size,
                                       num_workers=args.workers, device=device, precision=precision,
                                       representation="logits" if args.joint else "pre_logits")
        listed = min(topk, model.cfg.num_classes)
        if args.topk is not None and listed < args.topk:  # asked for, not the default: say why fewer are listed
            print(f"vitlab predict: --topk {args.topk} is more than the model's {listed} classes: all {listed} are "
                  "listed", file=sys.stderr)
        if args.out is not None:
            return _write(args, predictions, listed, write_features if args.features else write_predictions)
        return _print(args, predictions)


def _write_texts(args: argparse.Namespace) -> int:
    """``--texts``: the image-text model's unit text embeddings of the file's texts, written to ``--out``."""
    from .. import load_image_text
    from ..data import SPLIT_FOLDERS
    from ..data.captions import read_texts
    from ..devices import resolve_device
    from ..train.predict import iter_text_embeddings
    from ..train.predict_files import write_features

    with flags_in_errors({**FLAGS, "text_column": "--text-column"}, config_flags=False):
        texts = read_texts(args.texts, SPLIT_FOLDERS.get(args.split, (args.split,)), args.text_column)
        model = load_image_text(args.checkpoint).to(resolve_device(args.device)).eval()
        written = write_features(args.out, iter_text_embeddings(model, texts, batch_size=args.batch_size,
                                                                 precision=args.precision),
                                 metadata={"checkpoint": str(args.checkpoint)}, representation="text_embeds",
                                 what="text")
    print(f"wrote joint-space embeddings of {written.rows:,} texts to {written.path}")
    return 0


def _reported(predictions):
    """The predictions, each error also printed to stderr as it comes."""
    for p in predictions:
        if p.error:
            print(f"vitlab predict: error: {p.error}", file=sys.stderr)
        yield p


def _write(args: argparse.Namespace, predictions, listed: int, write) -> int:
    if args.features:
        written = write(args.out, _reported(predictions), metadata={"checkpoint": str(args.checkpoint)},
                        representation="image_embeds" if args.joint else "pre_logits")
        what = f"{'joint-space embeddings' if args.joint else 'features'} of {written.rows:,} images"
    else:
        written = write(args.out, _reported(predictions), listed)
        what = f"top-{listed} predictions for {written.rows:,} images"
    unreadable = f" ({len(written.errors):,} unreadable)" if written.errors else ""
    print(f"wrote {what}{unreadable} to {written.path}")
    return 1 if written.errors else 0


def _print(args: argparse.Namespace, predictions) -> int:
    failed = 0
    for r in predictions:
        if r.error:
            failed += 1
            if not args.json:
                print(f"vitlab predict: error: {r.error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"name": r.source, "error": r.error,  # "name", as the server's answers call it
                              "top": [{"index": i, "class": name, "probability": p} for i, name, p in r.top]}))
        elif not r.error:
            ranked = ", ".join(f"{name} {100 * p:.1f}%" for _, name, p in r.top)
            print(f"{r.source}: {ranked}")
    return 1 if failed else 0
