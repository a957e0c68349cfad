"""``vitlab train``: train a ViT from a recipe, a saved config, flags and ``--set key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import InvalidValueError, VitlabError

# flag -> TrainConfig field; every field can also be set with --set
FLAG_FIELDS = {
    "data": str, "data_dir": str, "val_data": str, "model": str, "img_size": int, "epochs": float, "steps": int,
    "batch_size": int, "lr": float, "weight_decay": float, "warmup_epochs": float, "accum_steps": int, "seed": int,
    "device": str, "precision": str, "threads": int, "num_workers": int, "out_dir": str, "run_name": str,
    "augment": str, "label_smoothing": float, "ema_decay": float, "on_bad_image": str,
    "freeze_blocks": int, "freeze": list, "layer_decay": float,
    "lora_rank": int, "lora_alpha": float, "lora_dropout": float, "lora_targets": list, "lora_train": list,
    "loss": str, "classes": str,
}
# on/off flags (store_true; --no-progress stores False)
SWITCHES = ("compile", "download", "deterministic", "fsdp", "progress", "linear_probe", "normalize_from_data", "dora",
            "merge_lora")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``finetune``."""
    p.add_argument("--recipe", help="start from a named recipe (see --list-recipes)")
    p.add_argument("--config", metavar="JSON", help="start from a saved config (a run's config.json)")
    g = p.add_argument_group("common settings (any config field can be changed with --set)")
    g.add_argument("--data", help="named set (fashion-mnist, mnist, cifar10, cifar100, digits), image folder, "
                                  ".csv / .jsonl manifest, tar shards or a Hugging Face source (hf:org/name, "
                                  "save_to_disk folder, parquet)")
    g.add_argument("--data-dir", help="folder holding a named set's files")
    g.add_argument("--val-data", help="evaluation data (default: the test split of --data)")
    add_hf_data_arguments(g)
    g.add_argument("--model", help="registered model name (vitlab models)")
    g.add_argument("--img-size", type=int, help="input resolution")
    g.add_argument("--epochs", type=float)
    g.add_argument("--steps", type=int, help="optimiser steps (instead of epochs)")
    g.add_argument("--batch-size", type=int, help="global batch per optimiser step")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--loss", choices=["auto", "softmax", "sigmoid"],
                   help="softmax cross-entropy, or sigmoid cross-entropy (multi-label; head bias -10); auto: sigmoid "
                        "for multi-label data")
    g.add_argument("--classes", metavar="FILE", help="class list of a manifest (one name a line)")
    g.add_argument("--channels", type=int, metavar="N",
                   help="image channels (model_args.in_chans): 1, 3, or more for .npy / multi-band TIFF images; an "
                        "RGB checkpoint's input layer is adapted")
    g.add_argument("--normalize-from-data", action="store_true", default=None,
                   help="per-channel mean / std measured on the training images (saved with the model)")
    g.add_argument("--augment", help="inception, crop, shift, flip, resize or none")
    g.add_argument("--ema-decay", type=float, help="Polyak / EMA averaging factor (0 = off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--precision", help="fp32, bf16 or auto")
    g.add_argument("--threads", type=int, help="torch threads per process")
    g.add_argument("--workers", dest="num_workers", type=int, help="DataLoader workers (image folders, shards)")
    g.add_argument("--out-dir", help="where run folders go (default runs/)")
    g.add_argument("--run-name", help="run folder name (default: data-model-time)")
    g.add_argument("--on-bad-image", choices=["skip", "fail"])
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--download", action="store_true", default=None, help="download a missing named set")
    g.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    g.add_argument("--fsdp", action="store_true", default=None, help="FSDP2 sharding (with torchrun / --nproc)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="change any config field, e.g. --set mixup=0.8 --set model_args.depth=4 (repeatable)")
    t = p.add_argument_group("fine-tuning controls (docs/training.md)")
    t.add_argument("--linear-probe", action="store_true", default=None,
                   help="train the head only (final norm frozen, dropout and drop-path off)")
    t.add_argument("--freeze-blocks", type=int, metavar="N", help="freeze the embedding and the first N blocks")
    t.add_argument("--freeze", action="append", metavar="PATTERNS",
                   help="freeze parameters by name: globs, module prefixes, ranges, comma-separated or repeated "
                        "(e.g. patch_embed,pos_embed,blocks.0-5)")
    t.add_argument("--layer-decay", type=float, metavar="D",
                   help="layer-wise lr decay (BEiT / MAE): layer l trains at lr x D^(L+1-l), e.g. 0.75")
    lo = p.add_argument_group("LoRA / DoRA adapters, through peft (docs/training.md)")
    lo.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R LoRA adapters on a frozen model")
    lo.add_argument("--lora-alpha", type=float, metavar="A", help="scale the adapters' update by A/R (default A = R)")
    lo.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapters' input (default 0)")
    lo.add_argument("--lora-targets", action="append", metavar="LAYERS",
                    help="layers of every block to adapt: qkv, proj, fc1, fc2, attn (qkv,proj), mlp (fc1,fc2); "
                         "default qkv,proj")
    lo.add_argument("--lora-train", action="append", metavar="WHAT",
                    help="what else trains: head, norm (every LayerNorm), freeze-style patterns, or none; default: "
                         "the head when it is new")
    lo.add_argument("--dora", action="store_true", default=None, help="DoRA: LoRA with a learned magnitude per row")
    lo.add_argument("--merge-lora", action="store_true", default=None,
                    help="also save the merged model (model.safetensors) beside adapter.safetensors")
    p.add_argument("--nproc", metavar="N", type=nproc_value,
                   help="run N data-parallel processes on this machine (via torchrun; 'auto': one per GPU, or one per "
                        "CPU core with one thread each)")


def add_hf_data_arguments(p) -> None:
    """``--image-column`` / ``--label-column`` / ``--stream``: choices for Hugging Face sources (docs/data.md)."""
    p.add_argument("--image-column", help="Hugging Face sources: the image column (default: the Image feature)")
    p.add_argument("--label-column", help="Hugging Face sources: the label column (default: the ClassLabel, or "
                                          "label / labels)")
    p.add_argument("--stream", choices=["auto", "on", "off"],
                   help="Hugging Face sources: read piece by piece (on), with random access (off), or stream above "
                        "1 GiB of files (auto, the default)")


def hf_data(spec: str | None, args: argparse.Namespace, option: str = "--data") -> str | None:
    """``spec`` with ``--image-column`` / ``--label-column`` / ``--stream`` written into it (a Hugging Face source's
    ``?`` options, kept in the run's config); refused for other sources."""
    from ..data.hf import looks_like_hf, with_options

    chosen = {k: getattr(args, k, None) for k in ("image_column", "label_column", "stream")}
    if spec is None or not any(chosen.values()):
        return spec
    if not looks_like_hf(spec):
        used = ", ".join("--" + k.replace("_", "-") for k, v in chosen.items() if v)
        raise InvalidValueError(f"{used}: only for Hugging Face sources, and {option} {spec} is not one")
    return with_options(spec, **chosen)


def nproc_value(text: str) -> int | str:
    """``--nproc``: a whole number of processes (1 or more) or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"takes a number of processes (an integer >= 1) or 'auto', got {text!r}")
    return n


def _flag(field_name: str) -> str:
    return "--workers" if field_name == "num_workers" else "--" + field_name.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, list):  # repeatable flags (--freeze, --lora-targets): as typed, comma-separated
        return ",".join(map(str, value))
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def build_config(args: argparse.Namespace, base_recipe: str | None = None):
    """The resolved TrainConfig: recipe or saved config, then flags, then --set. A value out of range is refused
    naming the flag (or ``--set key=value``, or the saved config) it came from and what it takes."""
    from ..train.config import ConfigValueError

    try:
        return _build_config(args, base_recipe)
    except ConfigValueError as exc:
        field_name = exc.field
        set_keys = {item.partition("=")[0].strip().replace("-", "_"): item for item in args.assignments}
        if field_name in set_keys:
            raise VitlabError(f"--set {set_keys[field_name]}: takes {exc.takes}") from None
        if field_name in FLAG_FIELDS and getattr(args, field_name, None) is not None:
            raise VitlabError(f"{_flag(field_name)} {_shown(getattr(args, field_name))}: takes {exc.takes}") from None
        source = args.config or f"recipe {args.recipe or base_recipe}"
        raise VitlabError(f"{source}: {exc}") from None


def _build_config(args: argparse.Namespace, base_recipe: str | None = None):
    from ..train import TrainConfig, apply_overrides, get_recipe

    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                config = TrainConfig.from_dict(json.load(f))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VitlabError(f"--config {args.config}: not a readable JSON config ({exc})") from None
        if args.recipe:
            raise InvalidValueError("give --recipe or --config, not both")
    else:
        name = args.recipe or base_recipe
        config = get_recipe(name).config() if name else TrainConfig()
    flags = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}
    for k in SWITCHES:
        if getattr(args, k, None) is not None:
            flags[k] = getattr(args, k)
    if flags.get("steps") is not None:
        flags.setdefault("epochs", None)
    if getattr(args, "channels", None) is not None:
        flags["model_args"] = {**config.model_args, "in_chans": args.channels}
    config = config.replace(**flags) if flags else config
    config = apply_overrides(config, args.assignments)
    if any(getattr(args, k, None) for k in ("image_column", "label_column", "stream")):
        from ..data.hf import looks_like_hf

        val = config.val_data  # the choices also apply to a Hugging Face evaluation source
        config = config.replace(data=hf_data(config.data, args),
                                val_data=hf_data(val, args, "--val-data") if val and looks_like_hf(val) else val)
    return config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a ViT (recipes, checkpoints, resume, torchrun)",
        description="Train a ViT. Start from a recipe (--recipe, see --list-recipes) and change anything with flags "
                    "or --set key=value. Writes a run folder with config, metrics, checkpoints and the final model; "
                    "prints the test accuracy. Data-parallel: --nproc N, or torchrun --nproc_per_node=N -m vitlab "
                    "train ...")
    add_config_arguments(p)
    p.add_argument("--resume", metavar="RUN",
                   help="continue an interrupted run (its folder or a checkpoint file); 'auto': continue the run "
                        "these settings name (--run-name) when it has a checkpoint, else start it (default: "
                        "$VITLAB_RESUME)")
    p.add_argument("--list-recipes", action="store_true", help="list the named recipes and exit")
    p.add_argument("--show-recipe", metavar="NAME", help="print a recipe's full config (with your overrides) and exit")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def print_recipes() -> None:
    from ..train import list_recipes

    for recipe in list_recipes():
        print(f"{recipe.name:<16} {recipe.description}")


def relaunch_with_torchrun(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes (single node, standalone rendezvous)."""
    import torch
    from torch.distributed.run import main as torchrun_main

    from ..train.distributed import available_cpus

    argv = list(args._argv)
    cleaned, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        cleaned.append(item)
    cpu = (args.device or "auto") == "cpu" or not torch.cuda.is_available()
    if args.nproc == "auto":
        nproc = available_cpus() if cpu else torch.cuda.device_count()
    else:
        nproc = int(args.nproc)
    if nproc < 1:
        raise InvalidValueError(f"--nproc {args.nproc}: no GPU to start a process on (use --device cpu)")
    if cpu:  # share the cores out instead of letting every process start one thread per core
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // nproc)))
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's agent logs each signal it forwards as a warning; the processes say what happened themselves
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    import tempfile

    from ..train.stop import EXIT_STOPPED

    with tempfile.TemporaryDirectory(prefix="vitlab-") as tmp:
        # rank 0 leaves this file when a stop signal (forwarded by torchrun) ended the run with last.pt written
        stopped = os.environ[STOPPED_MARKER] = os.path.join(tmp, "stopped")
        try:
            torchrun_main(["--standalone", f"--nproc_per_node={nproc}", "-m", "vitlab", *cleaned])
        except ChildFailedError as exc:  # the processes have printed their own error lines
            codes = [failure.exitcode for failure in exc.failures.values()]
            return next((code for code in codes if code > 0), 1)
        except SignalException as exc:  # Ctrl-C / SIGTERM: torchrun has already stopped the processes
            return EXIT_STOPPED if os.path.exists(stopped) else 128 + int(exc.sigval)
        finally:
            os.environ.pop(STOPPED_MARKER, None)
    return 0


STOPPED_MARKER = "VITLAB_STOPPED_MARKER"


def report(result) -> None:
    """The lines a user looks for at the end of a run."""
    m = result.metrics or {}
    if "top1" in m:
        top5 = f", top-5 {100 * m['top5']:.2f}%" if "top5" in m else ""
        skipped = f", {m['skipped']} unreadable skipped" if m.get("skipped") else ""
        print(f"test accuracy: {100 * m['top1']:.2f}% (top-1{top5}) on {m['samples']:,} images{skipped}")
    else:
        print("no evaluation data: nothing measured (set --val-data)")
    mins, secs = divmod(int(round(result.train_seconds)), 60)
    tmins, tsecs = divmod(int(round(result.total_seconds)), 60)
    print(f"time: {mins}m{secs:02d}s training, {tmins}m{tsecs:02d}s in total; {result.steps} steps, "
          f"{result.epochs:.2f} epochs, {result.train_flops / 1e12:.1f} TFLOPs")
    print(f"run folder: {result.run_dir}")
    if result.model_path:
        print(f"model: {result.model_path}")


def resume_length(args: argparse.Namespace) -> dict:
    """``{"epochs": ...}`` or ``{"steps": ...}`` given with ``--resume`` (may be empty); any other setting is
    refused naming its flag, since a resumed run continues with its stored config (what a resume may change:
    :class:`~vitlab.train.runfolder.RunFolder`)."""
    from ..train.runfolder import RunFolder

    given = []
    if args.recipe:
        given.append(("recipe", f"--recipe {args.recipe}"))
    if args.config:
        given.append(("config", f"--config {args.config}"))
    for name in list(FLAG_FIELDS) + [k for k in SWITCHES if k != "normalize_from_data"]:
        value = getattr(args, name, None)
        if value is not None:
            shown = _flag(name) if isinstance(value, bool) else f"{_flag(name)} {_shown(value)}"
            given.append((name, "--no-progress" if name == "progress" else shown))
    for item in args.assignments:
        given.append((item.partition("=")[0].strip().replace("-", "_"), f"--set {item}"))
    length = {}
    for name, shown in given:
        if name in RunFolder.RUNTIME_FIELDS:
            continue
        if name in RunFolder.LENGTH_FIELDS and not length:
            value = getattr(args, name, None)
            if value is None:  # from --set
                from ..train.config import parse_value

                value = parse_value(name, shown.partition("=")[2])
            length[name] = value
            continue
        raise InvalidValueError(f"{shown}: cannot be changed on --resume (the run continues with the config stored "
                                "in its checkpoint; only a longer --epochs or --steps, --device, --threads, --workers "
                                "and --no-progress apply); start a new run to change it")
    return length


def resume_choice(given: str | None) -> str | None:
    """``--resume``, or ``$VITLAB_RESUME`` (set once in a job script) when it is not given: ``auto`` continues the
    run when it has a checkpoint and starts it otherwise (docs/training.md, clusters)."""
    if given is not None:
        return given
    env = os.environ.get("VITLAB_RESUME", "").strip()
    if env in ("", "0", "off", "never"):
        return None
    if env != "auto":
        raise InvalidValueError(f"VITLAB_RESUME={env}: takes auto (or off); give a run folder with --resume")
    return env


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print_recipes()
        return 0
    if args.show_recipe:
        args.recipe = args.show_recipe
        print(build_config(args).to_json())
        return 0
    config = build_config(args)
    if args.dry_run:
        print(config.to_json())
        return 0
    if args.nproc and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args)
    from ..train import train
    from ..train.runfolder import RunFinished
    from ..train.stop import RunStopped

    resume = resume_choice(args.resume)
    length = resume_length(args) if resume and resume != "auto" else {}
    try:
        result = train(config, resume=resume, **length)
    except RunFinished as exc:  # not an error: there is nothing left to do
        print(f"vitlab train: {exc}", file=sys.stderr)
        return 0
    except RunStopped:  # a stop signal: last.pt is written and the line logged; tell a --nproc parent
        if os.environ.get(STOPPED_MARKER) and int(os.environ.get("RANK", "0")) == 0:
            open(os.environ[STOPPED_MARKER], "w").close()
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        report(result)
        sys.stdout.flush()
    return 0
