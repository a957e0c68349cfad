"""The ``vitlab`` command: a thin layer that parses arguments, calls the library and prints.

Each sub-command lives in its own module here with ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules are found by scanning this package, so adding a command is adding its module (and its
line in :data:`COMMAND_HELP`). Only the module of the command being run is imported: ``vitlab --help``, ``vitlab
--version`` and a mistyped command answer without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

from ..errors import Stopped, VitlabError

# each command's line in `vitlab --help`, so that the listing needs none of the command modules (which import torch);
# the module (vitlab.cli.<command with - as _>) gives the same line to its parser, checked by tests/test_cli.py
COMMAND_HELP = {
    "bench": "benchmark models against timm in the same run",
    "convert": "convert a checkpoint to another layout (optionally new size/classes)",
    "eval": "accuracy, per-class accuracy, confusion matrix and calibration of a checkpoint on a data set",
    "experiment": "run one of the paper's experiments in small (table + plot)",
    "export": "export a model to ONNX or a PyTorch .pt2 package with a parity check",
    "export-onnx": "export a model to ONNX (and int8) with a parity check",
    "fewshot": "few-shot linear evaluation of frozen representations (paper section 3 / 4)",
    "finetune": "fine-tune a checkpoint on new data (paper recipe by default)",
    "finetune-image-text": "fine-tune CLIP / SigLIP contrastively on captioned images (LiT / FLYP)",
    "info": "describe a checkpoint file (any supported format)",
    "inspect": "filters, position-embedding similarity, attention distance and rollout figures",
    "models": "list the model variants with their size and compute",
    "predict": "top-k classes or features of image files, folders or a data set",
    "pretrain-mae": "masked autoencoder pre-training (self-supervised)",
    "pretrain-mpp": "masked patch prediction pre-training (self-supervised)",
    "push": "upload a model to the Hugging Face Hub (timm, transformers or vitlab layout, with a model card)",
    "serve": "serve a model over HTTP (API + web page) with dynamic batching",
    "soup": "average fine-tuned models into one (uniform, weighted or greedy model soup)",
    "suite": "VTAB-1k-style evaluation over a list of tasks (few-shot or fine-tuning), resumable",
    "train": "train a ViT (recipes, checkpoints, resume, torchrun)",
    "zero-shot": "a classifier of any classes from CLIP / SigLIP and prompts, no training",
}


def _module_names() -> list[str]:
    """The modules of this package that may define a sub-command, sorted (found without importing them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def command_modules() -> list[str]:
    """Names of the modules in this package that define a sub-command (a ``register`` function), sorted."""
    return [n for n in _module_names() if hasattr(importlib.import_module(f"{__name__}.{n}"), "register")]


def _command_of(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names: its first argument that is not an option (the top-level options take no
    value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser for ``argv``: the command it names registered in full (its module imported), every
    other listed by its help line alone. ``argv=None`` registers every command in full."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers: build, train, load, evaluate.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    parser.add_argument("--offline", action="store_true",
                        help="never use the network: pre-trained checkpoints (catalog names, hf-hub:, URLs) must be "
                             "in the cache (same as VITLAB_OFFLINE=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if argv is None else _command_of(argv)
    for name in _module_names():
        command = name.replace("_", "-")
        if argv is None or command == wanted or command not in COMMAND_HELP:
            module = importlib.import_module(f"{__name__}.{name}")
            if hasattr(module, "register"):
                module.register(subparsers)
        else:  # listed, not loaded: its module is imported only when it is the command being run
            subparsers.add_parser(command, help=COMMAND_HELP[command], add_help=False)
    return parser


def _count_interrupts() -> list[int]:
    """Under torchrun, a list that records each SIGINT this process gets (the handler still raises
    KeyboardInterrupt, as Python's default does); empty, and nothing installed, otherwise."""
    import signal
    import threading

    received: list[int] = []
    if "RANK" in os.environ and threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            received.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
    return received


# set by ``--nproc`` for the processes it starts under torchrun: the launcher then says what ended the run
LAUNCHED_BY_VITLAB = "VITLAB_STOPPED_MARKER"


def _interrupted(command: str) -> int:
    """Exit status 130, and the one line that says so (under torchrun every process gets the signal: rank 0 says
    it for all, or the ``--nproc`` launcher, which outlives the processes, says it once they have stopped)."""
    if os.environ.get("RANK", "0") == "0" and not os.environ.get(LAUNCHED_BY_VITLAB):
        print(f"vitlab {command}: interrupted", file=sys.stderr)
    return 130


_PYTHON_FORMATWARNING = warnings.formatwarning


def _one_line_warnings(command: str) -> None:
    """vitlab's own warnings (a zeroed head, emulated bf16, int8 on a CPU without VNNI) as one line, like its errors,
    instead of Python's ``path:line: Category: message`` plus the source line; other libraries' keep their form."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = _PYTHON_FORMATWARNING

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            return f"vitlab {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. User errors (:class:`~vitlab.errors.VitlabError`) print one line on
    stderr and return 2; anything else is a bug and propagates with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)  # imports the command's module: seconds, where a Ctrl-C must still be one line
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    args._argv = argv  # for commands that re-launch themselves (torchrun)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _one_line_warnings(args.command)
    if args.offline:  # read by vitlab.hub at each download; also reaches child processes (torchrun)
        os.environ["VITLAB_OFFLINE"] = "1"
    interrupts = _count_interrupts()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's flush at exit
        return code
    except VitlabError as exc:  # bad input: the message says what to change
        print(f"vitlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Stopped as exc:  # ended early on purpose (a scheduler's stop signal, a peer gone): its status
        if interrupts:
            return _interrupted(args.command)
        if not exc.shown:
            print(f"vitlab {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:  # the reader went away (``vitlab ... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        # under torchrun a process stopped by Ctrl-C drops out of the collectives, and the others then fail inside
        # one (gloo: "Connection closed by peer"); after a Ctrl-C that is the interrupt, not a bug
        if interrupts:
            return _interrupted(args.command)
        raise
