"""``vitlab bench``: vitlab next to timm in one run (throughput, latency, training steps, memory, MFU, the largest
training batch)."""

from __future__ import annotations

import argparse
import json
import sys

from ..atomic import write_text_atomic
from ..compute.bench import TASKS, BenchSettings, format_table, run_benchmarks
from ..errors import InvalidValueError
from ._merging import ALIASES, add_merge_tokens_argument
from .train import flags_in_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark models against timm in the same run",
        description="Inference throughput, batch-1 latency, training-step throughput, peak memory and MFU (against "
                    "a GEMM rate measured at the start, and for bf16 on a known GPU against its datasheet peak) of "
                    "vitlab models, with timm's same architecture measured in the same run (rounds alternate between "
                    "the two) and the ratio printed; the max-batch task finds the largest training batch that fits.")
    p.add_argument("models", nargs="+", help="registered model names, e.g. vit_ti16 vit_b16")
    p.add_argument("--tasks", help=f"comma-separated, from {', '.join(TASKS)} (default: inference,latency,train; "
                                   "inference,latency with --merge-tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (default fp32)")
    p.add_argument("--batch-size", type=int, default=8, help="batch for inference and int8 (default 8)")
    p.add_argument("--train-batch-size", type=int, help="batch for training steps (default: --batch-size)")
    p.add_argument("--img-size", type=int, help="resolution (default: the model's)")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations (both sides)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side, alternating (default 5)")
    p.add_argument("--iters", type=int, default=1, help="calls per round (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side first (default 2)")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime threads (default: torch's)")
    p.add_argument("--no-timm", action="store_true", help="measure vitlab only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s for a second MFU column (default for bf16 on a known GPU: its datasheet's)")
    p.add_argument("--max-batch-limit", type=int, default=4096, help="max-batch: the largest batch tried (4096)")
    p.add_argument("--max-batch-seconds", type=float, default=60.0,
                   help="max-batch: seconds one model's search may take; then the best found so far (default 60)")
    p.add_argument("--memory-limit-mb", type=float,
                   help="max-batch: the memory to fit in (CUDA: default the whole GPU; required on the CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON ('-' for stdout only); the "
                                                 "file is rewritten after every measurement, so a run stopped half-way "
                                                 "keeps what it measured (\"complete\": false)")
    add_merge_tokens_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    default_tasks = "inference,latency" if args.merge_tokens else "inference,latency,train"
    tasks = tuple(t.strip() for t in (args.tasks or default_tasks).split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise InvalidValueError(f"--tasks: unknown task(s) {', '.join(bad) or '(none given)'}; "
                                f"choose from {', '.join(TASKS)}")
    for option in ("batch_size", "train_batch_size", "rounds", "iters", "threads", "max_batch_limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise InvalidValueError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise InvalidValueError(f"--warmup must be >= 0, got {args.warmup}")
    for option in ("peak_tflops", "max_batch_seconds", "memory_limit_mb"):
        value = getattr(args, option)
        if value is not None and not value > 0:
            raise InvalidValueError(f"--{option.replace('_', '-')} must be > 0, got {value}")
    settings = BenchSettings(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                             train_batch_size=args.train_batch_size, img_size=args.img_size, compile=args.compile,
                             grad_checkpointing=args.grad_checkpointing, rounds=args.rounds, iters=args.iters,
                             warmup=args.warmup, threads=args.threads, timm=not args.no_timm,
                             memory=not args.no_memory,
                             peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
                             max_batch_limit=args.max_batch_limit, max_batch_seconds=args.max_batch_seconds,
                             memory_limit_mb=args.memory_limit_mb, merge_tokens=args.merge_tokens)
    to_stdout = args.json == "-"

    def keep(partial: dict) -> None:
        if args.json and not to_stdout:
            write_text_atomic(args.json, json.dumps(partial, indent=2) + "\n")

    with flags_in_errors({**ALIASES, "tasks": "--tasks"}, config_flags=False):
        report = run_benchmarks(args.models, tasks, settings,
                                log=lambda s: print(s, file=sys.stderr if to_stdout else sys.stdout, flush=True),
                                on_report=keep)
    if to_stdout:
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
