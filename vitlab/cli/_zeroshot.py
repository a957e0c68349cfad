"""The zero-shot options shared by ``vitlab zero-shot``, ``predict`` and ``eval``: the class names and the prompt
templates (:mod:`vitlab.zeroshot`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidValueError

# the library's argument names -> these options, for flags_in_errors
ALIASES = {"class_names": "--classes", "templates": "--template"}


def add_template_arguments(parser: argparse.ArgumentParser) -> None:
    """``--template T`` (repeatable) and ``--prompt-ensemble``."""
    parser.add_argument("--template", action="append", metavar="T",
                        help="prompt template with {} where the class name goes (repeat to average several; default "
                             "'a photo of a {}.')")
    parser.add_argument("--prompt-ensemble", action="store_true",
                        help="average a built-in set of 8 photo prompts per class (CLIP's prompt ensembling)")


def add_class_arguments(parser: argparse.ArgumentParser, lead: str = "") -> None:
    """``--classes A,B,C`` and ``--classes-file FILE`` (``lead`` starts their help)."""
    parser.add_argument("--classes", metavar="NAMES", help=f"{lead}the class names, comma-separated")
    parser.add_argument("--classes-file", type=Path, metavar="FILE",
                        help=f"{lead}the class names, one per line (blank lines and lines starting with # skipped)")


def templates_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The templates the options ask for (the default prompt when none)."""
    from ..zeroshot import DEFAULT_TEMPLATES, ENSEMBLE_TEMPLATES

    if args.prompt_ensemble and args.template:
        raise InvalidValueError("give --template or --prompt-ensemble, not both")
    if args.prompt_ensemble:
        return ENSEMBLE_TEMPLATES
    return tuple(args.template) if args.template else DEFAULT_TEMPLATES


def class_names_of(args: argparse.Namespace, required: bool = True) -> list[str] | None:
    """The class names of ``--classes`` / ``--classes-file`` (None when neither is given and not ``required``)."""
    if args.classes is not None and args.classes_file is not None:
        raise InvalidValueError("give --classes or --classes-file, not both")
    if args.classes is not None:
        names = [n.strip() for n in args.classes.split(",")]
        if not all(names):
            raise InvalidValueError(f"--classes: an empty name in {args.classes!r} (names are comma-separated)")
        return names
    if args.classes_file is not None:
        path = args.classes_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidValueError(f"--classes-file {path}: no such file") from None
        except (UnicodeDecodeError, IsADirectoryError) as exc:
            raise InvalidValueError(f"--classes-file {path}: not a UTF-8 text file ({exc.__class__.__name__})") \
                from None
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not names:
            raise InvalidValueError(f"--classes-file {path}: no class names in it")
        return names
    if required:
        raise InvalidValueError("give the class names: --classes A,B,C or --classes-file FILE")
    return None
