"""The GPU suite: one command that proves vitlab's CUDA paths and measures them, for a lent GPU (docs/performance.md,
"The GPU suite").

    PYTHONPATH=. python benchmarks/gpu_suite.py [--out docs/performance] [--data-dir DIR] [--deadline 465]
    PYTHONPATH=. python benchmarks/gpu_suite.py --dry-run [--out DIR]   # every step on the CPU at tiny sizes

Steps, each in its own process with its own time budget, under one overall deadline (under 8 minutes on one H100):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py tests/test_train_precision.py``: bf16 / fp16 autocast logits and
   training steps against the CPU float32 result, the flash / memory-efficient SDPA kernels, ``torch.compile``
   parity, FSDP on one GPU, the memory gradient checkpointing saves, an exact resume, training steps that never
   synchronise with the GPU, a CLIP B/16-sized image-text model's logits under autocast; each test's measured
   numbers come back through JUnit properties.
2. ``bench``: vitlab against timm in one process (``vitlab.compute.bench``, what ``vitlab bench`` runs), bf16 at
   224 px: ViT-B/16 and ViT-L/16 training throughput and MFU eager and compiled, compiled inference, peak memory,
   the GEMM rate measured in the same run, MFU against the datasheet peak too.
3. ``max_batch``: the largest training batch of ViT-L/16 and ViT-H/14 that fits, without and with gradient
   checkpointing (steps tried, out-of-memory caught, each search time-bounded).
4. ``main_job``: ``vitlab train --recipe fashion-mnist`` on the GPU: time, test accuracy, share of step time spent
   waiting for data.

A step that fails, crashes or runs out of time is recorded (status, the end of its output or traceback) and the next
one runs; a child past its time is interrupted first (SIGINT), so that pytest still writes the JUnit file of the
tests that finished. The JSON and the Markdown table are rewritten after every step, so a suite stopped half-way
keeps what it measured. ``--dry-run`` runs the same steps on the CPU with tiny models, data and step counts
(tests/test_gpu_suite.py runs it in CI), with ``torch.compile``'s backend set to ``aot_eager`` (Dynamo and
AOTAutograd trace the real model; Inductor's C++ code generation would take minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "bench", "max_batch", "main_job")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Plan:
    """What each step runs and for how long (seconds): the GPU sizes, or the dry run's tiny ones."""

    device: str
    test_files: list[str]
    bench_models: list[str]
    bench: dict                       # vitlab.compute.bench.BenchSettings fields shared by the eager / compiled runs
    bench_train_batch: int
    bench_inference_batch: int
    max_batch_models: list[str]
    max_batch: dict                   # BenchSettings fields of the searches
    max_batch_seconds: dict           # per search: {"plain": s, "checkpointing": s}
    main_job: list[str]               # vitlab train arguments (the data folder and out dir are added)
    budgets: dict                     # step -> seconds
    deadline: float                   # the whole suite, seconds
    env: dict = field(default_factory=dict)


GPU_PLAN = Plan(
    device="cuda",
    # with the CUDA step of tests/test_train_precision.py that never synchronises (torch.cuda.set_sync_debug_mode)
    test_files=["tests/test_gpu.py", "tests/test_train_precision.py"],
    bench_models=["vit_b16", "vit_l16"],
    bench=dict(dtype="bf16", rounds=5, iters=2, warmup=2),
    bench_train_batch=128,
    bench_inference_batch=256,
    max_batch_models=["vit_l16", "vit_h14"],
    max_batch=dict(dtype="bf16", max_batch_limit=4096),
    max_batch_seconds={"plain": 10.0, "checkpointing": 18.0},
    # the recipe as it is (float32, Muon + AdamW, batch 256, 20 epochs: the CPU's 92.7-93.1%): a 0.3M-parameter
    # model is bound by kernel launches on a GPU, where bf16 autocast only adds casts
    main_job=["--recipe", "fashion-mnist", "--device", "cuda"],
    # estimated on an H100 (docs/performance.md): tests about 90 s (two cold Inductor compiles, 30-45 s), bench
    # 200-260 s (eight cold compiles: ViT-L/16's compiled rows may be cut), max_batch 60-65 s, main job 45-60 s
    # (4680 launch-bound steps of about 800 operators)
    budgets={"tests": 110, "bench": 190, "max_batch": 75, "main_job": 80},
    deadline=465,
)

DRY_PLAN = Plan(
    device="cpu",
    test_files=["tests/test_gpu.py"],
    bench_models=["vit_ti16"],
    # two blocks (both sides), no peak-memory pass: the CPU profiler it needs is slow (max_batch measures memory)
    bench=dict(dtype="fp32", img_size=32, depth=2, rounds=1, iters=1, warmup=1, gemm_size=256, memory=False),
    bench_train_batch=2,
    bench_inference_batch=2,
    max_batch_models=["vit_fmnist"],
    max_batch=dict(dtype="fp32", max_batch_limit=512, memory_limit_mb=24),
    max_batch_seconds={"plain": 30.0, "checkpointing": 30.0},
    main_job=["--recipe", "fashion-mnist", "--device", "cpu", "--steps", "3", "--batch-size", "32",
              "--set", "eval_batch_size=64"],
    budgets={"tests": 240, "bench": 150, "max_batch": 90, "main_job": 90},
    deadline=600,
    # the Dynamo -> AOTAutograd path of torch.compile without Inductor's C++ compilation (PyTorch releases that
    # read TORCH_COMPILE_OVERRIDE_BACKENDS, 2.14 here; older ones compile with Inductor: slower, the same checks)
    # one thread: tiny sizes gain nothing from two, and a busy machine's spinning threads cost a lot
    env={"VITLAB_GPU_TEST_DEVICE": "cpu", "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager", "OMP_NUM_THREADS": "1"},
)


# ----------------------------------------------------------------------------------------------- child processes

def child_env(plan: Plan) -> dict:
    env = dict(os.environ, **plan.env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WORLD_SIZE", None)  # never a torchrun world inherited by accident
    return env


@dataclass
class ChildResult:
    returncode: int | None            # None: stopped at its time limit
    seconds: float
    tail: str                         # the last lines of its output


def run_child(cmd: list[str], timeout: float, env: dict, label: str, keep_lines: int = 40) -> ChildResult:
    """Run ``cmd`` in its own process group, echo its output with a ``[label]`` prefix, stop the group (SIGTERM,
    then SIGKILL) after ``timeout`` seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            del lines[:-keep_lines]
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc)
    reader.join(timeout=5)
    return ChildResult(None if timed_out else proc.returncode, time.monotonic() - start, "\n".join(lines))


def _stop_group(proc: subprocess.Popen) -> None:
    # SIGINT first: a KeyboardInterrupt lets pytest end its session and write the JUnit file of the tests that
    # finished (SIGTERM would end it at once, without the file); then SIGTERM, then SIGKILL
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group this suite started for the child (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _status(child: ChildResult) -> str:
    return "timeout" if child.returncode is None else "ok" if child.returncode == 0 else "failed"


# ------------------------------------------------------------------------------------------------------ the steps

# pytest with Python's SIGINT handler (KeyboardInterrupt) installed even where the suite was started with SIGINT
# ignored (a background job of a non-interactive shell), which its children would inherit
_PYTEST = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.exit(pytest.main(sys.argv[1:]))")


def step_tests(plan: Plan, work: Path, timeout: float) -> dict:
    junit = work / "tests.xml"
    args = ["-m", "gpu", *plan.test_files, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o",
            "junit_family=xunit1"]
    cmd = [sys.executable, "-c", _PYTEST, *args]
    # deterministic cuBLAS for the exact-resume test, set before cuBLAS starts (only here: the small workspaces it
    # asks for would slow the benchmarks' products)
    env = dict(child_env(plan), CUBLAS_WORKSPACE_CONFIG=":4096:8") if plan.device == "cuda" else child_env(plan)
    child = run_child(cmd, timeout, env, "tests")
    results = parse_junit(junit) if junit.is_file() else {"tests": []}
    counts = {k: sum(t["outcome"] == k for t in results["tests"]) for k in ("passed", "failed", "skipped")}
    status = _status(child)
    if status == "ok" and counts["passed"] == 0:
        status = "failed"  # nothing ran: a broken collection, or every test skipped
    out = {"status": status, "command": shlex.join(["pytest", *args]), "results": {**counts, **results}}
    if status != "ok":
        out["error"] = child.tail
    return out


def parse_junit(path: Path) -> dict:
    """Every test case of a JUnit XML file: name, outcome, seconds, message and the properties it recorded."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a stop interrupted: an empty entry
            continue
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                text = (node.get("message") or "") + "\n" + (node.text or "")
                message = "\n".join(line for line in text.strip().splitlines()[-12:])
                break
        props = {}
        for prop in case.iter("property"):
            value = prop.get("value")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            props[prop.get("name")] = value
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                      "message": message, "measured": props})
    return {"tests": tests}


def step_bench(plan: Plan, work: Path, timeout: float) -> dict:
    base = dict(plan.bench, device=plan.device, train_batch_size=plan.bench_train_batch,
                batch_size=plan.bench_inference_batch)
    runs = [
        {"label": "eager", "models": plan.bench_models, "tasks": ["train"], "settings": base},
        {"label": "compiled", "models": plan.bench_models, "tasks": ["inference", "train"],
         "settings": dict(base, compile=True)},
    ]
    return _worker_step("bench", plan, work, runs, timeout)


def step_max_batch(plan: Plan, work: Path, timeout: float) -> dict:
    runs = [{"label": mode, "models": plan.max_batch_models, "tasks": ["max-batch"],
             "settings": dict(plan.max_batch, device=plan.device, timm=False, grad_checkpointing=mode != "plain",
                              max_batch_seconds=plan.max_batch_seconds[mode])}
            for mode in ("plain", "checkpointing")]
    return _worker_step("max_batch", plan, work, runs, timeout)


def _worker_step(name: str, plan: Plan, work: Path, runs: list[dict], timeout: float) -> dict:
    """Run ``runs`` (vitlab.compute.bench measurements) in one child process; each run's report file is rewritten
    after every measurement, so a child stopped at its time limit leaves what it measured."""
    for i, run in enumerate(runs):
        run["json"] = str(work / f"{name}_{i}_{run['label']}.json")
    spec = work / f"{name}.spec.json"
    spec.write_text(json.dumps(runs))
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], timeout,
                      child_env(plan), name)
    reports = []
    for run in runs:
        path = Path(run["json"])
        report = json.loads(path.read_text()) if path.is_file() else None
        reports.append({"label": run["label"], "tasks": run["tasks"], "report": report,
                        "complete": bool(report and report.get("complete"))})
    status = _status(child)
    if status == "ok" and not all(r["complete"] for r in reports):
        status = "failed"
    out = {"status": status, "results": {"runs": reports}}
    if status != "ok":
        out["error"] = child.tail
    return out


def worker(spec_path: str) -> int:
    """The child of the bench and max_batch steps: each run of the spec through vitlab.compute.bench."""
    import gc

    import torch

    from vitlab.compute.bench import BenchSettings, bench_device, measure_max_batch, run_benchmarks
    from vitlab.models import create_model

    for run in json.loads(Path(spec_path).read_text()):
        settings = BenchSettings(**run["settings"])
        out = Path(run["json"])

        def keep(report: dict, out: Path = out) -> None:
            _write(out, json.dumps(report, indent=1))

        print(f"--- {run['label']}: {', '.join(run['models'])} ({', '.join(run['tasks'])})", flush=True)
        if run["tasks"] == ["max-batch"]:
            # one model built at a time, searched alone on the device (no timm twin)
            device = bench_device(settings.device)
            report = {"settings": asdict(settings), "results": [], "complete": False}
            for name in run["models"]:
                if device.type == "cuda":  # the last search's cached blocks given back first: this model's weights
                    gc.collect()           # would otherwise be carved out of them and split the free memory
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                with device:  # initialised where it runs: ViT-H/14's 632M weights take seconds on a CPU
                    model = create_model(name)
                report["results"].append(measure_max_batch(name, model, settings, device, print).to_dict())
                keep(report)
                del model
            report["complete"] = True
            keep(report)
        else:
            keep(run_benchmarks(run["models"], tuple(run["tasks"]), settings, log=print, on_report=keep))
    return 0


def step_main_job(plan: Plan, work: Path, timeout: float, data_dir: Path | None, dry_run: bool,
                  extra: list[str]) -> dict:
    if dry_run:
        data_dir = work / "fashion-mnist"
        write_tiny_fashion_mnist(data_dir)
    data_dir = data_dir or (DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else None)
    if data_dir is None:
        return {"status": "failed", "error": "no Fashion-MNIST files: pass --data-dir (a folder with the four "
                                             "*-ubyte.gz files; Debian: /usr/share/datasets/fashion-mnist)"}
    out_dir = work / "runs"
    cmd = [sys.executable, "-m", "vitlab", "train", *plan.main_job, *extra, "--data-dir", str(data_dir),
           "--out-dir", str(out_dir), "--run-name", "main-job", "--no-progress"]
    child = run_child(cmd, timeout, child_env(plan), "main_job")
    out = {"status": _status(child), "command": shlex.join(["vitlab", *cmd[3:]])}
    result_file = out_dir / "main-job" / "result.json"
    if child.returncode == 0 and result_file.is_file():
        result = json.loads(result_file.read_text())
        config = json.loads((out_dir / "main-job" / "config.json").read_text())
        train_s = result["train_seconds"]
        out["results"] = {
            "train_seconds": round(train_s, 2), "total_seconds": round(result["total_seconds"], 2),
            "command_seconds": round(child.seconds, 2), "steps": result["steps"], "epochs": result["epochs"],
            "top1": result["metrics"].get("top1"), "top5": result["metrics"].get("top5"),
            "data_seconds": round(result.get("data_seconds", float("nan")), 3),
            "data_wait_share": round(result.get("data_seconds", float("nan")) / max(train_s, 1e-9), 4),
            "images_per_s": round(result["steps"] * config["batch_size"] / max(train_s, 1e-9), 1),
            "precision": result["precision"], "device": result["device"], "batch_size": config["batch_size"]}
    elif out["status"] == "ok":
        out["status"] = "failed"
    if out["status"] != "ok":
        out["error"] = child.tail
    return out


def write_tiny_fashion_mnist(folder: Path, n_train: int = 512, n_test: int = 128) -> None:
    """Fashion-MNIST's four IDX files with random 28x28 images (a bright row per class, so there is something to
    learn): the dry run's data."""
    import numpy as np

    from vitlab.data.idx import write_idx

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 96, (n, 28, 28), dtype=np.uint8)
        images[np.arange(n), 4 + 2 * labels] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


# ---------------------------------------------------------------------------------------------- environment, files

_ENV_CODE = """
import json, platform, torch
cuda = torch.cuda.is_available()
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cuda_available": cuda}
if cuda:
    props = torch.cuda.get_device_properties(0)
    info.update(device_name=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                compute_capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def environment(plan: Plan) -> dict:
    """Versions and the device, read in a child (this process never starts CUDA: it would hold GPU memory)."""
    env = {"cpu": _cpu_name(), "host": platform.node(), "commit": _git_commit()}
    try:
        done = subprocess.run([sys.executable, "-c", _ENV_CODE], capture_output=True, text=True, timeout=120,
                              env=child_env(plan), cwd=ROOT)
        env.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        env["error"] = f"{type(exc).__name__}: {exc}"
    if plan.device == "cpu" or "device_name" not in env:
        env["device_name"] = env["cpu"]
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _write(path: Path, text: str) -> None:
    """Write atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- the report

def _num(v, fmt=".1f", scale=1.0, suffix="") -> str:
    return "-" if v is None else f"{v * scale:{fmt}}{suffix}"


def markdown(report: dict) -> str:
    """The report as Markdown: a summary of the steps, then one table per step and the failures."""
    env = report["environment"]
    lines = [f"# GPU suite: {env.get('device_name')}{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"{report['started']} UTC; torch {env.get('torch')} (CUDA {env.get('cuda') or '-'}), Python "
             f"{env.get('python')}, vitlab {env.get('commit') or '(no git)'}; host CPU {env.get('cpu')}"
             + (f", GPU memory {env['gpu_memory_gb']} GiB" if env.get("gpu_memory_gb") else "") + ".", "",
             f"Command: `{report['command']}`; {report['seconds']:.0f} s in all (deadline {report['deadline_s']} s)"
             + (f", {report['cpu_seconds']:.0f} CPU seconds in its processes" if report.get("cpu_seconds") else "")
             + ".",
             "", "| step | status | seconds | budget (s) |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {_num(step.get('seconds'), '.0f')} | "
                     f"{_num(step.get('budget_s'), '.0f')} |")
    steps = report["steps"]
    if "tests" in steps and steps["tests"].get("results"):
        r = steps["tests"]["results"]
        lines += ["", f"## Tests: `pytest -m gpu` ({r['passed']} passed, {r['failed']} failed, {r['skipped']} "
                      "skipped)", "", "| test | outcome | s | measured |", "|---|---|---|---|"]
        for t in r["tests"]:
            measured = ", ".join(f"{k} {v}" for k, v in t["measured"].items())
            if t["outcome"] == "skipped":
                measured = t["message"].splitlines()[0] if t["message"] else ""
            lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {measured.replace('|', '/')} |")
    if "bench" in steps and steps["bench"].get("results"):
        lines += ["", "## vitlab against timm, same process", ""]
        rows = []
        for run in steps["bench"]["results"]["runs"]:
            rep = run["report"]
            if rep is None:
                lines.append(f"- {run['label']}: no result")
                continue
            s = rep["settings"]
            peak = rep.get("peak_flops")
            lines.append(f"- {run['label']}: {s['dtype']}, {s['img_size'] or 224} px"
                         + (f", {s['depth']} blocks" if s.get("depth") else "") + ", GEMM rate "
                         f"{rep['gemm_flops']['peak'] / 1e12:.1f} TFLOP/s measured"
                         + (f", datasheet peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
                         + (f", timm {rep['environment'].get('timm')}" if rep.get("environment") else "")
                         + ("" if run["complete"] else " (stopped before the end)"))
            rows += [(run["label"], r) for r in rep["results"]]
        lines += ["", "| model | mode | task | batch | vitlab img/s | timm img/s | vitlab / timm | MFU (GEMM) | "
                      "MFU (datasheet) | timm MFU (datasheet) | peak MB vitlab | peak MB timm |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows:
            lines.append(f"| {r['model']} | {label} | {r['task']} | {r['batch_size']} | {r['vitlab']:.1f} | "
                         f"{_num(r['timm'])} | {_num(r['ratio'], '.2f')} | {_num(r['mfu_vitlab'], '.1f', 100, '%')} "
                         f"| {_num(r.get('mfu_peak_vitlab'), '.1f', 100, '%')} | "
                         f"{_num(r.get('mfu_peak_timm'), '.1f', 100, '%')} | {_num(r['peak_mem_mb_vitlab'], '.0f')} "
                         f"| {_num(r['peak_mem_mb_timm'], '.0f')} |")
    if "max_batch" in steps and steps["max_batch"].get("results"):
        lines += ["", "## Largest training batch (AdamW step, autocast as set)", "",
                  "| model | checkpointing | largest | first failing | estimate | tries | peak MB | time-limited |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in steps["max_batch"]["results"]["runs"]:
            for r in (run["report"] or {}).get("results", []):
                e = r["extra"]
                lines.append(f"| {r['model']} | {'yes' if e['grad_checkpointing'] else 'no'} | {e['largest']} | "
                             f"{e['failed'] or '-'} | {e['estimate']} | {len(e['tries'])} | "
                             f"{_num(r['peak_mem_mb_vitlab'], '.0f')} | {'yes' if e['timed_out'] else 'no'} |")
    if "main_job" in steps and steps["main_job"].get("results"):
        r = steps["main_job"]["results"]
        lines += ["", f"## Main job: `{steps['main_job']['command']}`", "",
                  "| training s | command s | test top-1 | data wait | images/s | steps | precision |",
                  "|---|---|---|---|---|---|---|",
                  f"| {r['train_seconds']:.1f} | {r['command_seconds']:.1f} | {_num(r['top1'], '.2f', 100, '%')} | "
                  f"{_num(r['data_wait_share'], '.1f', 100, '%')} | {r['images_per_s']:.0f} | {r['steps']} | "
                  f"{r['precision']} |"]
    failures = [(name, step) for name, step in steps.items() if step["status"] not in ("ok", "pending")]
    if failures:
        lines += ["", "## Failures"]
        for name, step in failures:
            lines += ["", f"### {name}: {step['status']}", "", "```", step.get("error", "").strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ the suite

def run_suite(args: argparse.Namespace) -> dict:
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    deadline_s = args.deadline or plan.deadline
    start = time.monotonic()
    deadline = start + deadline_s
    chosen = [s for s in STEPS if s in args.steps]
    env = environment(plan)
    name = f"gpu-suite-{slug(env['device_name'])}" + ("-dry-run" if args.dry_run else "")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "vitlab-gpu-suite" if args.dry_run
                                          else ROOT / "docs" / "performance")
    report = {"suite": "vitlab GPU suite", "dry_run": args.dry_run,
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "command": shlex.join(["python", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
              "deadline_s": deadline_s, "environment": env, "plan": asdict(plan), "seconds": 0.0,
              "steps": {s: {"status": "pending", "budget_s": plan.budgets[s]} for s in chosen}}
    paths = (out / f"{name}.json", out / f"{name}.md")

    def save() -> None:
        report["seconds"] = round(time.monotonic() - start, 1)
        _write(paths[0], json.dumps(report, indent=1) + "\n")
        _write(paths[1], markdown(report))

    extra = shlex.split(args.main_job_args or "")
    with tempfile.TemporaryDirectory(prefix="vitlab-gpu-suite-") as tmp:
        work = Path(tmp)
        runners = {
            "tests": lambda t: step_tests(plan, work, t),
            "bench": lambda t: step_bench(plan, work, t),
            "max_batch": lambda t: step_max_batch(plan, work, t),
            # absolute: the main job runs in the repository root, which need not be this process's folder
            "main_job": lambda t: step_main_job(plan, work, t, Path(args.data_dir).resolve() if args.data_dir
                                                else None, args.dry_run, extra),
        }
        lock = threading.Lock()

        def one(step: str) -> None:
            budget = plan.budgets[step]
            timeout = min(budget, deadline - time.monotonic())
            print(f"=== {step} (budget {budget} s, {deadline - time.monotonic():.0f} s to the deadline)", flush=True)
            t0 = time.monotonic()
            if timeout < 5:
                result = {"status": "skipped", "error": "no time left before the suite's deadline"}
            else:
                try:
                    result = runners[step](timeout)
                except Exception:  # a bug in the suite itself: recorded, and the next step still runs
                    result = {"status": "error", "error": "".join(traceback.format_exc().splitlines(True)[-15:])}
            result.update(seconds=round(time.monotonic() - t0, 1), budget_s=budget)
            with lock:
                report["steps"][step] = result
                print(f"=== {step}: {result['status']} in {result['seconds']:.0f} s", flush=True)
                save()

        # the dry run's tests beside the other steps (two CPU cores finish sooner); on a GPU one step at a time, so
        # that no step's timings or memory are disturbed by another's
        beside = threading.Thread(target=one, args=("tests",)) if args.dry_run and "tests" in chosen else None
        if beside is not None:
            beside.start()
        for step in chosen:
            if beside is None or step != "tests":
                one(step)
        if beside is not None:
            beside.join()
        report["cpu_seconds"] = round(sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f)
                                          for f in ("ru_utime", "ru_stime")), 1)
    save()
    print(f"wrote {paths[0]} and {paths[1]}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    parser.add_argument("--out", help="folder for the JSON and Markdown files (default docs/performance; dry run: "
                                      "a folder under the system's temporary directory)")
    parser.add_argument("--data-dir", help="Fashion-MNIST's IDX files for the main job (default: Debian's)")
    parser.add_argument("--deadline", type=float, help="seconds for the whole suite (default 465; dry run 600)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--main-job-args", help="extra vitlab train arguments for the main job, e.g. '--epochs 30'")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # the bench / max_batch child
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown or not args.steps:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STEPS)}")
    report = run_suite(args)
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
