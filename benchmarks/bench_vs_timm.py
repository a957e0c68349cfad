"""The issue-8 benchmark suite: vitlab next to timm in one process run, on this machine's CPU (or CUDA).

    PYTHONPATH=. nice -n 10 python benchmarks/bench_vs_timm.py [--out benchmarks/results/cpu.json] [--quick]

CPU (default): fp32 inference at 224 px for ViT-Ti/16 (batch 16), S/16 (8) and B/16 (8); batch-1 latency of Ti/16;
int8 inference of B/16 (batch 8) against timm fp32; training steps of S/16 (batch 8). CUDA (--device cuda): bf16
autocast inference and training of B/16 (and the MFU against the bf16 GEMM rate). Prints a table per group and
writes every number (per-round times included) as JSON.
"""

from __future__ import annotations

import argparse
import json

from vitlab.atomic import write_text_atomic
from vitlab.compute.bench import BenchSettings, format_table, run_benchmarks

CPU_SUITE = [  # (models, tasks, batch, train batch)
    (["vit_ti16"], ("inference", "latency"), 16, None),
    (["vit_s16"], ("inference",), 8, None),
    (["vit_b16"], ("inference", "int8"), 8, None),
    (["vit_s16"], ("train",), 8, 8),
]
CUDA_SUITE = [
    (["vit_b16"], ("inference", "latency"), 256, None),
    (["vit_b16"], ("train",), 128, 128),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory pass")
    parser.add_argument("--out", help="JSON file for every number")
    args = parser.parse_args()
    suite = CUDA_SUITE if args.device.startswith("cuda") else CPU_SUITE
    reports = []
    for models, tasks, batch, train_batch in suite:
        settings = BenchSettings(device=args.device, dtype="bf16" if args.device.startswith("cuda") else "fp32",
                                 batch_size=batch, train_batch_size=train_batch,
                                 rounds=3 if args.quick else args.rounds, threads=args.threads,
                                 compile=args.compile, grad_checkpointing=args.grad_checkpointing,
                                 memory=not args.quick)
        report = run_benchmarks(models, tasks, settings, log=lambda s: print(s, flush=True))
        print(format_table(report), flush=True)
        reports.append(report)
    if args.out:
        write_text_atomic(args.out, json.dumps(reports, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
