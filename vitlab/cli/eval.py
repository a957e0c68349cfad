"""``vitlab eval CKPT --data ...``: accuracy of a saved model on a data set: top-1 / top-5, loss, per-class accuracy,
confusion matrix, calibration (ECE) and ReaL-style multi-label accuracy, with a JSON / Markdown / PNG report; for
multi-label data, mean average precision, F1 at a threshold and top-1 (any correct label); with --retrieval, image <->
text recall@K of an image-text model on captioned images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import check_folder
from ..errors import InvalidValueError
from ._merging import ALIASES, add_merge_tokens_argument
from ._zeroshot import ALIASES as ZERO_SHOT_ALIASES
from ._zeroshot import add_template_arguments, templates_of
from .train import EVAL_DATA_FLAGS, add_hf_data_arguments, flags_in_errors, hf_data

# eval_checkpoint's arguments that library errors name -> this command's flags
FLAGS = {**EVAL_DATA_FLAGS, "img_size": "--img-size", "map_classes_by_name": "--map-classes-by-name",
         "labels_file": "--labels", "zero_shot_templates": "--zero-shot", **ALIASES, **ZERO_SHOT_ALIASES}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy, per-class accuracy, confusion matrix and calibration of a "
                                           "checkpoint on a data set",
                              description="Evaluate a checkpoint (any format vitlab.load reads) on a named set, an "
                                          "image folder or tar shards, with the model's own preprocessing: top-1 / "
                                          "top-5, loss, per-class accuracy, confusion matrix, expected calibration "
                                          "error, and ReaL-style accuracy with --labels. Exact under torchrun (each "
                                          "process takes a disjoint share; no sample is counted twice). With "
                                          "--retrieval: an image-text model's image -> text and text -> image "
                                          "recall@1/5/10 on captioned images.")
    p.add_argument("checkpoint", help="any checkpoint vitlab.load reads, or an .onnx / .pt2 file from `vitlab export`")
    p.add_argument("--data", required=True, help="named set, image folder, .csv / .jsonl manifest, tar shards or a "
                                                 "Hugging Face source (hf:org/name, save_to_disk folder, parquet / "
                                                 "arrow files)")
    add_hf_data_arguments(p)
    p.add_argument("--split", default="test", help="split of a named set or folder tree (default test)")
    p.add_argument("--data-dir", help="folder holding a named set's files")
    p.add_argument("--out", type=Path, help="report folder: results.json, report.md, confusion.png, reliability.png")
    p.add_argument("--labels", type=Path,
                   help="ReaL-style multi-label JSON (a prediction is right if it is any of the image's labels): a "
                        "list of label lists (an image folder's files in sorted name order) or {file name: labels}")
    p.add_argument("--max-samples", type=int, help="evaluate a seeded random subset of this many images")
    p.add_argument("--bins", type=int, default=15, help="confidence bins of the calibration error (default 15)")
    p.add_argument("--model", help="registered model name, for checkpoint layouts that do not store the architecture")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for folders and shards")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or bf16 / fp16 autocast (fp16: for GPUs without bf16)")
    p.add_argument("--img-size", type=int, help="evaluate at this resolution (position embeddings resampled)")
    p.add_argument("--on-bad-image", default="skip", choices=["skip", "fail"])
    p.add_argument("--map-classes-by-name", action="store_true",
                   help="evaluate on the classes the checkpoint and the data both name (logits taken in the data's "
                        "order); without it, data whose classes differ from the checkpoint's are refused")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="multi-label data: a label counts as predicted at this sigmoid probability (F1; default 0.5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_merge_tokens_argument(p)
    p.add_argument("--zero-shot", action="store_true",
                   help="CHECKPOINT is an image-text model (CLIP, SigLIP): evaluate it as the zero-shot classifier of "
                        "the data's class names (docs/zero-shot.md)")
    add_template_arguments(p)
    p.add_argument("--retrieval", action="store_true",
                   help="CHECKPOINT is an image-text model and --data captioned images (a .csv / .jsonl manifest or "
                        "Hugging Face source with a text column): image -> text and text -> image recall@1/5/10 "
                        "(docs/zero-shot.md)")
    p.add_argument("--text-column", help="with --retrieval: the captions' column (default: text, caption or captions; "
                                         "a Hugging Face source's caption / captions / text / texts / sentences)")
    p.set_defaults(func=run)


# options that are about classification: refused with --retrieval (flag, whether it was given)
CLASSIFICATION_ONLY = (("--zero-shot", "zero_shot"), ("--template", "template"),
                       ("--prompt-ensemble", "prompt_ensemble"), ("--labels", "labels"),
                       ("--map-classes-by-name", "map_classes_by_name"), ("--max-samples", "max_samples"),
                       ("--img-size", "img_size"), ("--model", "model"), ("--merge-tokens", "merge_tokens"),
                       ("--label-column", "label_column"), ("--stream", "stream"))


def run_retrieval(args: argparse.Namespace) -> int:
    """``--retrieval``: :func:`vitlab.tasks.runs.retrieval_checkpoint`, one process."""
    import os

    from ..tasks.runs import retrieval_checkpoint

    given = [flag for flag, name in CLASSIFICATION_ONLY if getattr(args, name, None)]
    if given:
        raise InvalidValueError(f"--retrieval scores captioned images; drop {', '.join(given)} (classification "
                                "options)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InvalidValueError("--retrieval runs in one process (the similarity matrix needs every embedding); run "
                                "it without torchrun")
    plain = argparse.Namespace(**{**vars(args), "text_column": None})  # the text column is passed on as is
    with flags_in_errors({**FLAGS, "text_column": "--text-column"}, config_flags=False):
        results = retrieval_checkpoint(args.checkpoint, hf_data(args.data, plain), args.split, out_dir=args.out,
                                       text_column=args.text_column, batch_size=args.batch_size,
                                       num_workers=args.workers, device=args.device, precision=args.precision,
                                       on_bad_image=args.on_bad_image, progress=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from ..evaluate.report import retrieval_summary

    skipped = f" ({results['skipped']} unreadable images left out, e.g. {results['skipped_images'][0]})" \
        if results.get("skipped") else ""
    print(f"{args.data} {args.split}: {retrieval_summary(results)}{skipped}")
    if "files" in results:
        print(f"wrote {', '.join(Path(p).name for p in results['files'].values())} to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..tasks.runs import eval_checkpoint
    from ..train import distributed as D

    for option, value in (("--batch-size", args.batch_size), ("--bins", args.bins),
                          ("--max-samples", args.max_samples or 1)):
        if value < 1:
            raise InvalidValueError(f"{option} must be positive")
    if args.out is not None:  # a file in the way: say so now, not after the pass over the data
        check_folder(args.out)
    if args.retrieval:
        return run_retrieval(args)
    if args.text_column:
        raise InvalidValueError("--text-column names the captions of --retrieval; add --retrieval")
    if (args.template or args.prompt_ensemble) and not args.zero_shot:
        raise InvalidValueError("--template / --prompt-ensemble choose the prompts of --zero-shot; add --zero-shot")
    templates = templates_of(args) if args.zero_shot else None
    info = D.setup(args.device)
    skipped: list[str] = []
    try:
        with flags_in_errors(FLAGS, config_flags=False):
            results = eval_checkpoint(
                args.checkpoint, hf_data(args.data, args), args.split, out_dir=args.out, labels_file=args.labels,
                data_dir=args.data_dir, img_size=args.img_size, model_name=args.model, batch_size=args.batch_size,
                num_workers=args.workers, device=str(info.device), precision=args.precision,
                on_bad_image=args.on_bad_image, max_samples=args.max_samples, num_bins=args.bins,
                progress=info.is_main, on_skipped=skipped.extend, map_classes_by_name=args.map_classes_by_name,
                threshold=args.threshold, merge_tokens=args.merge_tokens, zero_shot_templates=templates)
    finally:
        D.teardown()
    if not info.is_main:
        return 0
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if "class_mapping" in results:
        m = results["class_mapping"]
        left = f"; {m['images_left_out']:,} images of other classes left out" if m["images_left_out"] else ""
        print(f"classes matched by name: {m['matched']} of the data's {m['data_classes']} (the checkpoint has "
              f"{m['model_classes']}){left}" + (f"; unmatched: {', '.join(m['unmatched'][:5])}"
                                                 + (", ..." if len(m["unmatched"]) > 5 else "")
                                                 if m["unmatched"] else ""))
    if "token_merging" in results:
        r, tokens = results["token_merging"]["r"], results["token_merging"]["tokens"]
        print(f"token merging: r = {r[0] if len(set(r)) == 1 else ','.join(map(str, r))} per block, tokens "
              f"{' -> '.join(map(str, tokens))}")
    if results.get("multi_label"):
        from ..evaluate.report import multilabel_summary

        print(f"{args.data} {args.split}: {multilabel_summary(results)}"
              + (f" ({results['skipped']} unreadable skipped, e.g. {skipped[0] if skipped else '?'})"
                 if results.get("skipped") else ""))
        if "files" in results:
            print(f"wrote {', '.join(Path(p).name for p in results['files'].values())} to {args.out}")
        return 0
    line = f"{args.data} {args.split}: top-1 {100 * results['top1']:.2f}%"
    if "top5" in results:
        line += f", top-5 {100 * results['top5']:.2f}%"
    line += f", loss {results['loss']:.4f} on {results['samples']:,} images"
    if results.get("skipped"):
        line += f" ({results['skipped']} unreadable skipped, e.g. {skipped[0] if skipped else '?'})"
    print(line)
    print(f"mean per-class accuracy {100 * results['mean_class_accuracy']:.2f}%, macro F1 "
          f"{100 * results['macro_f1']:.2f}%, ECE "
          f"{100 * results['calibration']['ece']:.2f}% ({args.bins} bins)"
          + (f", ReaL top-1 {100 * results['real']['accuracy']:.2f}% on {results['real']['counted']:,} images"
             if "real" in results else ""))
    if "files" in results:
        print(f"wrote {', '.join(Path(p).name for p in results['files'].values())} to {args.out}")
    return 0
