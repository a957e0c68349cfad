"""``vitlab zero-shot MODEL --classes A,B,C --out clf.safetensors``: a classifier of any classes from an image-text
model (CLIP, SigLIP) and prompts, without training; every other command then takes the file."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InvalidValueError
from ._zeroshot import ALIASES, add_class_arguments, add_template_arguments, class_names_of, templates_of
from .train import EVAL_DATA_FLAGS, add_hf_data_arguments, flags_in_errors, hf_data

FLAGS = {**EVAL_DATA_FLAGS, **ALIASES, "out": "--out"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("zero-shot", help="a classifier of any classes from CLIP / SigLIP and prompts, no "
                                                "training",
                              description="Write a classifier of the given classes, built from an image-text model "
                                          "(CLIP, SigLIP) without training: each class name goes into the prompt "
                                          "templates, the text tower embeds them, and the classifier's head holds "
                                          "the class embeddings times the model's logit scale. The output is a "
                                          "vitlab .safetensors file that eval, predict, serve, export and finetune "
                                          "take like any other. docs/zero-shot.md")
    p.add_argument("model", help="an image-text model vitlab.load_image_text reads: hf-hub:openai/clip-vit-base-"
                                 "patch16, hf-hub:google/siglip-base-patch16-224, a model folder or file")
    add_class_arguments(p)
    p.add_argument("--data", help="instead of --classes: take the class names of this data set (named set, image "
                                  "folder, manifest, Hugging Face source)")
    add_hf_data_arguments(p)
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--data-dir", help="folder holding a named set's files")
    add_template_arguments(p)
    p.add_argument("--out", required=True, help="the classifier's .safetensors file (must not exist)")
    p.add_argument("--device", default="auto", help="where the text tower runs (default: a GPU when there is one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import save
    from ..atomic import check_new_file
    from ..devices import resolve_device
    from ..zeroshot import zero_shot_classifier

    templates = templates_of(args)
    names = class_names_of(args, required=args.data is None)
    if names is not None and args.data is not None:
        raise InvalidValueError("give the class names (--classes / --classes-file) or --data, not both")
    with flags_in_errors(FLAGS, config_flags=False):
        out = check_new_file(args.out, ".safetensors", "a zero-shot classifier")
        if names is None:
            names = _data_class_names(hf_data(args.data, args), args.split, args.data_dir)
        from .. import load_image_text

        model = load_image_text(args.model).to(resolve_device(args.device)).eval()
        classifier = zero_shot_classifier(model, names, templates).cpu()
    metadata = {"loss": classifier.loss,
                "zero_shot": {"source": args.model, "templates": list(templates), "classes": len(names)}}
    save(classifier, out, metadata=metadata)
    result = {"out": str(out), "classes": len(names), "templates": list(templates), "loss": classifier.loss,
              "source": args.model}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    print(f"zero-shot classifier of {len(names)} classes ({shown}) from {args.model}, {len(templates)} prompt "
          f"template{'s' * (len(templates) > 1)}, {classifier.loss} probabilities: wrote {out}", file=sys.stdout)
    return 0


def _data_class_names(data: str, split: str, data_dir: str | None) -> list[str]:
    from ..evaluate.data import class_names_of, eval_dataset
    from ..preprocessing import Preprocessing

    dataset = eval_dataset(data, split, Preprocessing.for_model((224, 224), 3), data_dir=data_dir, on_error="skip")
    names = class_names_of(dataset)
    if not names:
        raise InvalidValueError(f"--data {data}: the data set names no classes; give --classes or --classes-file")
    return list(names)
