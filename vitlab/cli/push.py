"""``vitlab push MODEL REPO_ID``: share a model, checkpoint or training run on the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json

from ..checkpoints.hub_layout import HUB_LAYOUTS
from ..errors import InvalidValueError
from ..factory import hub_folder, push_to_hub


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("push", help="upload a model to the Hugging Face Hub (timm, transformers or vitlab "
                                           "layout, with a model card)",
                              description="Write MODEL (a checkpoint path or name, or a vitlab training run folder) "
                                          "in a Hub layout with a model card README.md, create REPO_ID if it does "
                                          "not exist and upload the files as one commit. HF_TOKEN (or `hf auth "
                                          "login`) gives the write access; HF_ENDPOINT picks the Hub. Afterwards "
                                          "`vitlab.load('hf-hub:REPO_ID')` reads it, and so does the layout's "
                                          "library (timm.create_model('hf-hub:REPO_ID', pretrained=True) / "
                                          "transformers' AutoModelForImageClassification).")
    p.add_argument("model", help="checkpoint path or name, or a training run folder (its model.safetensors, and "
                                 "its data, recipe and test metrics for the model card)")
    p.add_argument("repo_id", help="the Hub repo, ORG/NAME (created when it does not exist)")
    p.add_argument("--layout", choices=("auto", *HUB_LAYOUTS), default="auto",
                   help="timm: config.json + timm state dict (ViTs timm can build); hf: a transformers folder; "
                        "vitlab: vitlab's own file (any vitlab model); auto (default): timm where it holds the "
                        "model, else vitlab")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--revision", help="upload to this branch (created when new; default main)")
    p.add_argument("--message", help="the commit message (default: 'Upload model with vitlab')")
    p.add_argument("--license", help="the licence for the model card's front matter (e.g. apache-2.0; default: "
                                     "the catalog entry's for a catalog name, else none)")
    p.add_argument("--dry-run", action="store_true", help="write the repo's files into --out and upload nothing")
    p.add_argument("--out", help="with --dry-run: the folder to write (replaced if it exists)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        if not args.out:
            raise InvalidValueError("push --dry-run: give the folder to write with --out DIR")
        result = hub_folder(args.model, args.out, repo_id=args.repo_id, layout=args.layout, license=args.license)
    else:
        if args.out:
            raise InvalidValueError("push --out: only with --dry-run (a push writes into a temporary folder)")
        result = push_to_hub(args.model, args.repo_id, layout=args.layout, private=args.private,
                             revision=args.revision, commit_message=args.message, license=args.license)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.dry_run:
        print(f"wrote {result['folder']} ({result['layout']} layout for {args.repo_id}): {', '.join(result['files'])}; "
              "nothing uploaded")
    else:
        print(f"pushed {args.model} to {result['repo_id']} ({result['layout']} layout, {result['revision']}): "
              f"{result['commit_url']}")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0
