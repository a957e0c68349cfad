"""``vitlab fewshot``: the paper's few-shot linear evaluation of frozen representations (plus kNN and a logistic
probe), over shots and seeds, with a JSON / Markdown / PNG report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import check_folder
from ..errors import InvalidValueError
from ..evaluate.features import REPRESENTATIONS
from ..evaluate.probes import PROBES
from .train import EVAL_DATA_FLAGS, add_hf_data_arguments, flags_in_errors, hf_data


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fewshot", help="few-shot linear evaluation of frozen representations (paper section 3 / 4)",
        description="Fit closed-form regularised least squares from frozen representations to {-1, 1}^K targets on "
                    "1 / 5 / 10 / 25 images per class, for several seeds, the l2 strength picked on held-out "
                    "training images; report test accuracy mean and spread. kNN and a logistic probe run on the same "
                    "features.")
    p.add_argument("checkpoint", metavar="CKPT", help="any checkpoint vitlab.load reads")
    p.add_argument("--data", required=True, help="a named data set (fashion-mnist, mnist, digits, cifar10, ...), an "
                                                 "image folder, tar shards or a Hugging Face source")
    add_hf_data_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="report folder (created if missing)")
    p.add_argument("--train-split", default="train", help="split the shots and held-out images come from")
    p.add_argument("--test-split", default="test", help="split that is scored")
    p.add_argument("--data-dir", help="where named data sets' files are")
    p.add_argument("--representation", choices=REPRESENTATIONS, default="pre_logits",
                   help="pre_logits: what the head sees (default); cls_token: the class token after the final norm; "
                        "gap: mean of the patch tokens after the final norm")
    p.add_argument("--methods", nargs="+", choices=list(PROBES), default=["lsr", "knn", "linear"],
                   help="lsr = closed-form least squares (the paper's), knn, linear = logistic probe (default: all)")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10, 25], help="images per class (default: 1 5 10 25)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the draws (default: 0 1 2)")
    p.add_argument("--holdout-per-class", type=int, default=10,
                   help="held-out training images per class that pick each probe's hyper-parameter (default: 10)")
    p.add_argument("--l2-grid", nargs="+", type=float, help="l2 strengths tried (default: 2^-10 ... 2^19)")
    p.add_argument("--max-test", type=int, help="score a seeded random subset of this many test images")
    p.add_argument("--model", help="registered model name, for checkpoint layouts that do not store the architecture")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.report import fewshot_summary
    from ..tasks.runs import fewshot_checkpoint

    for option, value in (("--batch-size", args.batch_size), ("--holdout-per-class", args.holdout_per_class),
                          ("--max-test", args.max_test or 1), ("--workers", args.workers + 1)):
        if value < 1:
            raise InvalidValueError(f"{option} must be positive")
    if args.out is not None:  # a file in the way: say so now, not after the pass over the data
        check_folder(args.out)
    with flags_in_errors(EVAL_DATA_FLAGS, config_flags=False):
        results = fewshot_checkpoint(
            args.checkpoint, hf_data(args.data, args), args.out, train_split=args.train_split,
            test_split=args.test_split, data_dir=args.data_dir, representation=args.representation,
            methods=args.methods, shots=args.shots, seeds=args.seeds, holdout_per_class=args.holdout_per_class,
            max_test=args.max_test, grids={"lsr": args.l2_grid} if args.l2_grid else None, model_name=args.model,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=True)
    print(f"few-shot on {results['data']}, {results['representation']} features ({results['feature_dim']}-d), "
          f"{results['num_test']} test images, test accuracy % (mean ± std over {len(results['seeds'])} seeds):")
    print(fewshot_summary(results))
    print(f"wrote {', '.join(Path(p).name for p in results['files'].values())} to {args.out}")
    return 0
