"""``vitlab train``: train a ViT from a recipe, a saved config, flags and ``--set key=value`` overrides."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import types
import typing
from dataclasses import fields

from ..errors import InvalidValueError, VitlabError
from ..train import apply_overrides, get_recipe
from ..train.config import RULES, ConfigValueError, OverrideError, TrainConfig, parse_value, sections
from ..train.runfolder import RunFinished, RunFolder
from . import LAUNCHED_BY_VITLAB

# TrainConfig field -> its flag, for the fields that have one (``setting(..., flag=...)`` in vitlab/train/config.py);
# every field can also be set with --set
FLAG_FIELDS = {f.name: f.metadata["flag"] if isinstance(f.metadata["flag"], str) else
               ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
               for f in fields(TrainConfig) if f.metadata.get("flag")}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train``, ``finetune`` and ``pretrain-mpp``: a flag for each TrainConfig field that has one,
    with the field's documentation as its help, grouped as the config's sections are."""
    p.add_argument("--recipe", help="start from a named recipe (see --list-recipes)")
    p.add_argument("--config", metavar="JSON", help="start from a saved config (a run's config.json)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="change any config field, e.g. --set mixup=0.8 --set model_args.depth=4 (repeatable)")
    hints = typing.get_type_hints(TrainConfig)
    for title, section in sections():
        flagged = [f for f in section if f.name in FLAG_FIELDS]
        if not flagged:
            continue
        g = p.add_argument_group(title)
        for f in flagged:
            _add_flag(g, f, hints[f.name])
        if title == "data":
            add_hf_data_arguments(g)
        if title == "model":
            g.add_argument("--channels", type=int, metavar="N",
                           help="image channels (model_args.in_chans): 1, 3, or more for .npy / multi-band TIFF "
                                "images; an RGB checkpoint's input layer is adapted")
    p.add_argument("--nproc", metavar="N", type=nproc_value,
                   help="run N data-parallel processes on this machine (via torchrun; 'auto': one per GPU, or one per "
                        "CPU core with one thread each)")


def _add_flag(group, f, hint) -> None:
    """The flag of field ``f``, from its type: a switch for a bool (``--no-x`` when it is on by default), a repeatable
    flag for a list, else one value of the field's type; a field with choices shows them (checked by the config, so
    that a wrong one is refused like any other value, naming the flag)."""
    flag, doc, metavar = FLAG_FIELDS[f.name], f.metadata["doc"], f.metadata.get("metavar")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = typing.get_origin(hint) or hint
    if kind is bool:
        on = f.default is not True
        group.add_argument(flag, dest=f.name, action="store_true" if on else "store_false", default=None,
                           help=doc if on else f"no {doc}")
        return
    rule = RULES.get(f.name)
    if metavar is None and rule is not None and rule.choices:
        metavar = "{" + ",".join(rule.choices) + "}"
    if kind is list:
        group.add_argument(flag, dest=f.name, action="append", metavar=metavar, help=doc)
    else:
        group.add_argument(flag, dest=f.name, type=kind, metavar=metavar, help=doc)


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


# keyword arguments of vitlab.train.train that are flags too (its epochs / steps are the config fields' flags)
TRAIN_ARGUMENTS = {"resume": "--resume"}
# keyword arguments of vitlab.data.build_dataset set by add_hf_data_arguments' flags (train, finetune, eval, fewshot)
DATA_ARGUMENTS = {"image_column": "--image-column", "label_column": "--label-column", "stream": "--stream"}
# the same for the evaluation commands (eval, fewshot), which also have --data-dir
EVAL_DATA_FLAGS = {"data_dir": "--data-dir", **DATA_ARGUMENTS}


def flag_message(message: str, options, aliases: dict | None = None, config_flags: bool = True) -> str:
    """``message`` of a library error with the settings it names (``VitlabError.options``: config fields or keyword
    arguments written ``name=value`` or ``name``) spelled as the flags that set them: ``steps=5`` becomes ``--steps
    5``, ``download=True`` ``--download``, ``out_dir`` ``--out-dir``, a field without a flag ``--set name=value``.
    ``aliases`` adds a command's own flags (``finetune``'s ``--from`` for ``init_from``); ``config_flags=False``
    (commands without the training config's flags) leaves every other name as Python spells it."""
    for name in options:
        flag = (aliases or {}).get(name)
        if config_flags:
            flag = flag or FLAG_FIELDS.get(name) or TRAIN_ARGUMENTS.get(name) or DATA_ARGUMENTS.get(name)
            if flag is None and name not in RULES and not hasattr(TrainConfig, name):
                continue
        elif flag is None:
            continue
        with_value, bare = (f"--set {name}=", f"--set {name}=...") if flag is None else (flag + " ", flag)
        # a name on its own, not part of a word, a path or a file name
        before, after = r"(?<![\w./\\=-])", r"(?![\w/=-]|\.\w)"
        if flag is not None:  # a switch: download=True is --download (a default-on field's flag is --no-...)
            message = re.sub(rf"{before}{re.escape(name)}=(True|False){after}", flag, message)
        message = re.sub(rf"{before}{re.escape(name)}=", with_value, message)
        message = re.sub(rf"{before}{re.escape(name)}{after}", bare, message)
    return message


@contextlib.contextmanager
def flags_in_errors(aliases: dict | None = None, config_flags: bool = True):
    """Rewrite a library error raised inside to name the flags of the settings it names (:func:`flag_message`); the
    error keeps its type and traceback."""
    try:
        yield
    except VitlabError as exc:
        if exc.options:
            exc.args = (flag_message(str(exc), exc.options, aliases, config_flags),)
        raise


def _shown(value) -> str:
    if isinstance(value, list):  # repeatable flags (--freeze, --lora-targets): as typed, comma-separated
        return ",".join(map(str, value))
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def print_pretraining_result(result, data: str, summary) -> int:
    """What ``pretrain-mpp`` / ``pretrain-mae`` print when the run ends: ``summary(metrics)`` when it evaluated, the
    pre-trained ViT and how to fine-tune it; under torchrun only rank 0 prints (one summary, not one per process)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.metrics:
        print(summary(result.metrics))
    if result.model_path:
        print(f"pre-trained ViT: {result.model_path}")
        print(f"fine-tune: vitlab finetune --from {result.model_path} --data {data}")
    return 0


def build_config(args: argparse.Namespace, base_recipe: str | None = None):
    """The resolved TrainConfig: recipe or saved config, then flags, then --set. A value out of range is refused
    naming the flag (or ``--set key=value``, or the saved config) it came from and what it takes."""
    try:
        return _build_config(args, base_recipe)
    except ConfigValueError as exc:
        field_name = exc.field
        set_keys = {item.partition("=")[0].strip().replace("-", "_"): item for item in args.assignments}
        if field_name in set_keys:
            raise VitlabError(f"--set {set_keys[field_name]}: takes {exc.takes}") from None
        if field_name in FLAG_FIELDS and getattr(args, field_name, None) is not None:
            shown = _shown(getattr(args, field_name))
            raise VitlabError(f"{FLAG_FIELDS[field_name]} {shown}: takes {exc.takes}") from None
        source = args.config or f"recipe {args.recipe or base_recipe}"
        raise VitlabError(f"{source}: {exc}") from None


def _build_config(args: argparse.Namespace, base_recipe: str | None = None):
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
    if flags.get("steps") is not None:
        flags.setdefault("epochs", None)
    if getattr(args, "channels", None) is not None:
        flags["model_args"] = {**config.model_args, "in_chans": args.channels}
    config = config.replace(**flags) if flags else config
    try:
        config = apply_overrides(config, args.assignments)
    except OverrideError as exc:  # the library names the key; here it came from --set
        exc.args = (f"--set {exc}",)
        raise
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
            if os.path.exists(stopped):
                return EXIT_STOPPED
            if exc.sigval == signal.SIGINT:  # the processes left the line to this launcher, which ends last
                print("vitlab train: interrupted", file=sys.stderr)
            return 128 + int(exc.sigval)
        finally:
            os.environ.pop(STOPPED_MARKER, None)
    return 0


STOPPED_MARKER = LAUNCHED_BY_VITLAB


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
    given = []
    if args.recipe:
        given.append(("recipe", f"--recipe {args.recipe}"))
    if args.config:
        given.append(("config", f"--config {args.config}"))
    for name, flag in FLAG_FIELDS.items():
        value = getattr(args, name, None)
        if value is not None:
            given.append((name, flag if isinstance(value, bool) else f"{flag} {_shown(value)}"))
    for item in args.assignments:
        given.append((item.partition("=")[0].strip().replace("-", "_"), f"--set {item}"))
    length = {}
    for name, shown in given:
        if name in RunFolder.RUNTIME_FIELDS:
            continue
        if name in RunFolder.LENGTH_FIELDS and not length:
            value = getattr(args, name, None)
            if value is None:  # from --set
                value = parse_value(name, shown.partition("=")[2])
            length[name] = value
            continue
        raise InvalidValueError(f"{shown}: cannot be changed on --resume (the run continues with the config stored "
                                "in its checkpoint; only a longer --epochs or --steps, --device, --threads, --workers, "
                                "--tracker and --no-progress apply); start a new run to change it")
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
    from ..train.stop import RunStopped

    resume = resume_choice(args.resume)
    length = resume_length(args) if resume and resume != "auto" else {}
    try:
        with flags_in_errors():
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
