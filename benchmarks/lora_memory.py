"""Peak memory of one fine-tuning step of ViT-B/16 on the CPU: full fine-tuning against LoRA.

    PYTHONPATH=. python benchmarks/lora_memory.py [--batch-size 8] [--rank 8] [--threads 2] [--json out.json]

Each mode runs in a fresh Python process (so that one mode's freed memory, which the C allocator may keep, cannot
hide the other's), with the same model (``vit_b16`` at 224x224, a new 1,000-class head), the same batch of random
images and labels, AdamW with weight decay (vitlab's optimiser groups), float32:

- ``full``: every parameter trains;
- ``lora``: rank-R LoRA adapters on every block's ``qkv`` and ``proj`` (vitlab's default targets, alpha = R), the
  new head trains, everything else is frozen (what ``vitlab finetune --lora-rank R`` does).

Memory is the process's resident set size (RSS) from ``/proc/self/status``: the baseline ``VmRSS`` after the model,
the optimiser and the batch are built, then the peak ``VmHWM`` of the step, reset just before the step through
``/proc/self/clear_refs`` (Linux). Reported: the peak of the first step over the baseline (it also allocates
AdamW's state) and of a second step (state already there, the steady state); the trainable and total parameter
counts, and the optimiser-state values (AdamW keeps two per trained value, plus a step counter per tensor). RSS
counts every allocation (PyTorch's and the allocator's slack alike); it is not PyTorch's own allocation count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vitlab.models import create_model
from vitlab.models.lora import LoraSettings, add_lora, count_parameters
from vitlab.train.optim import build_optimizer

MODES = ("full", "lora")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def _step(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(mode: str, batch_size: int, rank: int) -> dict:
    """One mode's numbers, measured in this process."""
    torch.manual_seed(0)
    model = create_model("vit_b16", num_classes=1000)
    if mode == "lora":
        add_lora(model, LoraSettings(rank=rank))
        for p in model.head.parameters():
            p.requires_grad_(True)
    model.train()
    optimizer = build_optimizer(model, "adamw", 1e-4, weight_decay=0.05)
    x = torch.randn(batch_size, 3, 224, 224)
    y = torch.randint(0, 1000, (batch_size,))
    baseline = _status("VmRSS")
    _reset_peak()
    first_seconds = _step(model, optimizer, x, y)
    first_peak = _status("VmHWM") - baseline
    _reset_peak()
    second_seconds = _step(model, optimizer, x, y)
    second_peak = _status("VmHWM") - baseline
    trainable, total = count_parameters(model)
    state_values = sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"mode": mode, "batch_size": batch_size, "rank": rank if mode == "lora" else None,
            "threads": torch.get_num_threads(), "params_total": total, "params_trainable": trainable,
            "optimizer_state_values": state_values, "baseline_rss_mib": baseline / 2**20,
            "first_step_peak_mib": first_peak / 2**20, "second_step_peak_mib": second_peak / 2**20,
            "first_step_seconds": first_seconds, "second_step_seconds": second_seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size, args.rank)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--batch-size", str(args.batch_size), "--rank",
               str(args.rank), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"ViT-B/16 224x224, batch {args.batch_size}, float32, AdamW, {args.threads} threads; peak RSS over the "
          "baseline (model, optimiser, batch built)")
    print(f"{'mode':<10} {'trainable':>12} {'total':>12} {'optim values':>13} {'baseline MiB':>13} "
          f"{'step 1 MiB':>11} {'step 2 MiB':>11} {'step 2 s':>9}")
    for r in rows:
        label = f"lora r{r['rank']}" if r["mode"] == "lora" else r["mode"]
        print(f"{label:<10} {r['params_trainable']:>12,} {r['params_total']:>12,} {r['optimizer_state_values']:>13,} "
              f"{r['baseline_rss_mib']:>13,.0f} {r['first_step_peak_mib']:>11,.0f} {r['second_step_peak_mib']:>11,.0f} "
              f"{r['second_step_seconds']:>9.1f}")
    full, lora = rows
    print(f"LoRA / full: step-1 peak x{lora['first_step_peak_mib'] / full['first_step_peak_mib']:.2f}, step-2 peak "
          f"x{lora['second_step_peak_mib'] / full['second_step_peak_mib']:.2f}, trainable "
          f"{100 * lora['params_trainable'] / full['params_trainable']:.2f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
