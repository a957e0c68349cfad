"""The ``vitlab`` command: a thin layer that parses arguments, calls the library and prints.

Each sub-command lives in its own module here with ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules are found by scanning this package, so adding a command is adding its module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import VitlabError


def command_modules() -> list[str]:
    """Names of the modules in this package that define a sub-command (a ``register`` function), sorted."""
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if hasattr(importlib.import_module(f"{__name__}.{n}"), "register"))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers: build, train, load, evaluate.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    parser.add_argument("--offline", action="store_true",
                        help="never use the network: pre-trained checkpoints (catalog names, hf-hub:, URLs) must be "
                             "in the cache (same as VITLAB_OFFLINE=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
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


def _interrupted(command: str) -> int:
    """Exit status 130, and the one line that says so (under torchrun every process gets the signal: rank 0 says
    it for all)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"vitlab {command}: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. User errors (:class:`~vitlab.errors.VitlabError`) print one line on
    stderr and return 2; anything else is a bug and propagates with its traceback."""
    try:
        parser = build_parser()  # imports every command's module: seconds, where a Ctrl-C must still be one line
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for commands that re-launch themselves (torchrun)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
    except BrokenPipeError:  # the reader went away (``vitlab ... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        # under torchrun a process stopped by Ctrl-C drops out of the collectives, and the others then fail inside
        # one (gloo: "Connection closed by peer"); after a Ctrl-C that is the interrupt, not a bug
        if interrupts:
            return _interrupted(args.command)
        raise
