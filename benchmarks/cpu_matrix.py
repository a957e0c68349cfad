"""vitlab against timm on this CPU, one table: fp32 / bf16 / int8 / pt2 inference at Ti/16, S/16, B/16 and the
S/16 training step, with the CPU model, its ISA flags and vitlab's measured kernel and precision choices recorded.

    PYTHONPATH=. python benchmarks/cpu_matrix.py [--models vit_ti16 vit_s16 vit_b16] [--train-model vit_s16]
        [--parts fp32 int8 bf16 pt2 train] [--rounds 5] [--batch-size 8] [--no-pt2] [--json cpu_matrix.json]
        [--markdown table.md]

``--parts`` and ``--models`` bound the time: on a loaded 2-core machine fp32 + int8 + bf16 + train for S/16 and B/16
take about half an hour at 5 rounds, and ``pt2`` adds a minute or more of compilation per model.

Every ratio is vitlab / timm speed measured in the same process with alternating rounds (median of per-round
ratios, :mod:`vitlab.compute.bench`), so load from other processes hits both sides alike; absolute img/s on a shared
machine are not comparable between runs. ``pt2`` compiles each model with AOTInductor first (a minute or more per
model: a C++ compiler builds the kernels) and times the package against timm in fp32 eager. ``bf16`` is autocast on
both sides; on CPUs without native bf16 it is emulated and slow (and vitlab's ``auto`` precision would not pick it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from vitlab.atomic import write_text_atomic
from vitlab.compute import onednn, precision
from vitlab.compute.bench import (
    BenchSettings,
    build_pair,
    format_table,
    interleaved_times,
    paired_ratio,
    run_benchmarks,
)
from vitlab.compute.pt2 import Pt2Classifier, export_pt2
from vitlab.models import create_model

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
             "avx512_fp16", "amx_fp16", "amx_int8", "amx_tile")


PARTS = ("fp32", "int8", "bf16", "pt2", "train")
NAMES = {"vit_ti16": "ViT-Ti/16", "vit_s16": "ViT-S/16", "vit_b16": "ViT-B/16"}
TASK_NAMES = {"inference": "inference fp32", "int8": "int8 (ONNX Runtime) vs timm fp32",
              "train": "training step fp32 (AdamW)", "bf16": "inference bf16 autocast, both sides",
              "pt2": "`.pt2` package vs timm fp32 eager"}


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (empty where the system has none): how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """The CPU model, the ISA flags that decide kernels, and vitlab's measured choices' key."""
    flags = precision.cpu_flags()
    return {"cpu": onednn._cpuinfo_field("model name") or "unknown", "vendor": onednn.cpu_vendor(),
            "isa": [f for f in ISA_FLAGS if f in flags], "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "torch": torch.__version__, "machine_key": onednn.machine_key()}


def markdown(report: dict) -> str:
    """The report as one Markdown table (the layout of docs/performance.md), load averages before and after."""
    info = report["machine"]
    lines = [f"{info['cpu']} ({info['cores']} cores, {' / '.join(info['isa'])}), torch {info['torch']}, "
             f"{info['threads']} threads; load average (1 / 5 / 15 min) "
             f"{' / '.join(map(str, report['load_before']))} before, {' / '.join(map(str, report['load_after']))} "
             f"after", "",
             "| model | task | batch | vitlab img/s | timm img/s | vitlab / timm | per-round ratios |",
             "|---|---|---|---|---|---|---|"]
    rows = [("fp32", r) for r in report.get("fp32", {}).get("results", [])]
    rows += [("bf16", r) for r in report.get("bf16", {}).get("results", [])] + [("pt2", r) for r in
                                                                                  report.get("pt2", [])]
    for part, r in rows:
        task = "bf16" if part == "bf16" else "pt2" if part == "pt2" else r["task"]
        times = r["extra"].get("rounds_s", {})
        per_round = " ".join(f"{t / v:.2f}" for v, t in zip(times.get("vitlab", []), times.get("timm", [])))
        note = f" (max logit difference {r['max_abs_diff']:.1e})" if part == "pt2" else ""
        lines.append(f"| {NAMES.get(r['model'], r['model'])} | {TASK_NAMES[task]} | {r['batch_size']} | "
                     f"{r['vitlab']:.2f} | {r['timm']:.2f} | **{r['ratio']:.2f}**{note} | {per_round} |")
    return "\n".join(lines) + "\n"


def pt2_row(name: str, settings: BenchSettings, folder: Path) -> dict:
    """The model compiled to a .pt2 package against timm fp32 eager, alternating rounds."""
    model, reference = build_pair(name, settings, torch.device("cpu"))
    model.eval()
    package = Pt2Classifier(export_pt2(model, folder / f"{name}.pt2"))
    x = torch.randn(settings.batch_size, model.cfg.in_chans, *model.cfg.img_size)
    with torch.inference_mode():
        diff = float((package(x) - reference.eval()(x)).abs().max())

    def run(m):
        def call():
            with torch.inference_mode():
                return m(x)
        return call

    times = interleaved_times({"vitlab": run(package), "timm": run(reference)}, settings.rounds, settings.iters,
                              torch.device("cpu"), settings.warmup)
    speed = {k: settings.batch_size / min(v) for k, v in times.items()}
    return {"model": name, "task": "pt2", "batch_size": settings.batch_size, "unit": "img/s",
            "vitlab": speed["vitlab"], "timm": speed["timm"], "ratio": paired_ratio(times["vitlab"], times["timm"]),
            "mfu_vitlab": None, "mfu_timm": None, "peak_mem_mb_vitlab": None, "peak_mem_mb_timm": None,
            "max_abs_diff": diff, "extra": {"rounds_s": times}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_ti16", "vit_s16", "vit_b16"])
    parser.add_argument("--train-model", default="vit_s16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default all): fp32 / int8 / bf16 / pt2 inference, train (the step)")
    parser.add_argument("--no-pt2", action="store_true", help="skip the .pt2 packages (their compilation is slow)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--markdown", help="also write the table (docs/performance.md layout) here")
    args = parser.parse_args()
    parts = [p for p in args.parts if not (p == "pt2" and args.no_pt2)]
    info = machine()
    print(f"CPU: {info['cpu']} ({info['vendor']}), ISA: {' '.join(info['isa'])}; torch {info['torch']}, "
          f"{info['threads']} threads; load average {load_average()}", flush=True)
    report = {"machine": info, "load_before": load_average(), "parts": parts}

    def save() -> None:  # after every model, so that a run cut short on a busy machine keeps what it measured
        report["load_after"] = load_average()
        if args.json:
            write_text_atomic(args.json, json.dumps(report, indent=1))
        if args.markdown:
            write_text_atomic(args.markdown, markdown(report))

    def measure(key: str, models: list[str], tasks: tuple[str, ...], settings: BenchSettings) -> None:
        for name in models:
            part = run_benchmarks([name], tasks, settings, print)
            if key in report:
                report[key]["results"] += part["results"]
            else:
                report[key] = part
            save()

    settings = BenchSettings(device="cpu", batch_size=args.batch_size, rounds=args.rounds, memory=False)
    tasks = tuple(t for t, part in (("inference", "fp32"), ("int8", "int8")) if part in parts)
    measure("fp32", args.models if tasks else [], tasks, settings)
    if "train" in parts:
        measure("fp32", [args.train_model], ("train",), settings)
    if "bf16" in parts:
        bf16 = BenchSettings(device="cpu", dtype="bf16", batch_size=args.batch_size, rounds=args.rounds,
                             memory=False)
        measure("bf16", args.models, ("inference",), bf16)
    if "pt2" in parts:
        report["pt2"] = []
        with tempfile.TemporaryDirectory(prefix="vitlab-pt2-") as folder:
            for name in args.models:
                report["pt2"].append(pt2_row(name, settings, Path(folder)))
                save()
    report["load_after"] = load_average()
    # what vitlab decided on this machine for these models (measured on first use, cached under $VITLAB_HOME)
    choices = {}
    for name in sorted({*args.models, args.train_model}):
        model = create_model(name)
        shapes = onednn.linear_shapes(model)
        choices[name] = {"onednn_linear": {f"{i}x{o}": c for (i, o), c in onednn.linear_choices(shapes).items()},
                         "auto_precision": precision.choose_cpu_precision("auto", onednn.linear_shapes(model, 0))}
    report["choices"] = choices
    if "fp32" in report:
        print("\nfp32 (vitlab default kernels) and int8 (ONNX Runtime) against timm:")
        print(format_table(report["fp32"]))
    if "bf16" in report:
        print("\nbf16 autocast, both sides:")
        print(format_table(report["bf16"]))
    if "pt2" in report:
        print("\n.pt2 package (AOTInductor) against timm fp32 eager:")
        for row in report["pt2"]:
            print(f"{row['model']:<10} batch {row['batch_size']}: {row['vitlab']:.2f} img/s vs {row['timm']:.2f}, "
                  f"ratio {row['ratio']:.2f}, max |logit diff| {row['max_abs_diff']:.1e}")
    print("\nvitlab's measured choices here:", json.dumps(choices, indent=1))
    print("\n" + markdown(report))
    save()


if __name__ == "__main__":
    main()
