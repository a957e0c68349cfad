"""``--merge-tokens R``, the token-merging option of the inference commands (predict, eval, bench, serve)."""

from __future__ import annotations

import argparse

FLAG = "--merge-tokens"
# the library's name for the count (vitlab.compute.merge_tokens(model, r)) -> this option, for flags_in_errors
ALIASES = {"r": FLAG, "merge_tokens": FLAG}


def merge_tokens_value(text: str) -> int | list[int]:
    """``R`` (tokens merged away per block) or ``R1,R2,...`` (one count per block), each an int >= 0."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes tokens to merge per block, an int >= 0 or a comma-separated list "
                                         f"with one per block, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"takes counts >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def add_merge_tokens_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(FLAG, type=merge_tokens_value, default=0, metavar="R",
                        help="token merging (ToMe, no retraining): merge away R tokens per encoder block (or "
                             "R1,R2,... per block; at most half of a block's patch tokens), for faster inference of a "
                             "ViT or hybrid at a small accuracy cost; 0 (default): off. docs/performance.md")
