"""Benchmarks of vitlab next to timm in one process run: throughput, latency, training steps, peak memory, MFU.

Every comparison is a ratio measured in the same run, with the same batch, threads, dtype and weights (timm's
weights are copied into the vitlab model, and the two outputs are compared before timing). Timing rounds alternate
between the two sides (vitlab, timm, vitlab, timm, ...) after a warm-up, and each ratio is the median of the per-round
ratios, so load from other processes and clock drift hit both sides alike. Model FLOPs utilisation (MFU) divides the
model's analytic FLOPs per second by a GEMM rate measured at the start of the run on the same device, and, for bf16 on
a GPU whose datasheet peak is known (:data:`DATASHEET_BF16_TFLOPS`, or ``peak_flops``), by that peak too. The
``max-batch`` task finds the largest training batch that fits in memory by trying training steps (out-of-memory
errors caught), starting from the analytic estimate of :mod:`vitlab.compute.memory`.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast, resolve_device
from ..errors import VitlabError
from ..models import create_model, get_config
from ..models.vit import ViTConfig
from .deploy import OnnxModel, export_onnx, quantize_int8
from .flops import forward_macs
from .memory import max_micro_batch
from .onednn import onednn_linear_available, onednn_product, set_onednn_linear

# vitlab name -> timm name of the same architecture (224 px; other resolutions are passed as img_size)
TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_s32": "vit_small_patch32_224",
    "vit_b8": "vit_base_patch8_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_l32": "vit_large_patch32_224",
    "vit_h14": "vit_huge_patch14_224",
}
TASKS = ("inference", "latency", "train", "int8", "max-batch")

# dense (no sparsity) bf16 tensor-core peak in TFLOP/s from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name in this order (the first name contained in it wins)
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def datasheet_peak_flops(device_name: str, dtype: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU named ``device_name`` (None for other dtypes or unknown GPUs)."""
    if dtype != "bf16":
        return None
    for name, tflops in DATASHEET_BF16_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


@dataclass
class BenchSettings:
    """What to measure and how. ``dtype`` is ``fp32`` or ``bf16`` (autocast; CUDA only); ``rounds`` timed rounds of
    ``iters`` calls per side after ``warmup`` calls."""

    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 8
    train_batch_size: int | None = None
    img_size: int | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    rounds: int = 5
    iters: int = 1
    warmup: int = 2
    threads: int | None = None
    timm: bool = True
    memory: bool = True
    peak_flops: float | None = None      # a peak FLOP/s for a second MFU (default: the datasheet's, when known)
    max_batch_limit: int = 4096          # max-batch: the largest batch tried
    max_batch_seconds: float = 60.0      # max-batch: the time one model's search may take (then the best so far)
    memory_limit_mb: float | None = None  # max-batch: the memory to fit in (CUDA: enforced; CPU: measured peak)
    gemm_size: int = 2048                # matrix size of the GEMM-rate measurement (at least 8192 on CUDA)
    depth: int | None = None             # fewer encoder blocks on both sides (quick checks of the machinery)


@dataclass
class Result:
    """One measurement: a model, a task and the numbers of each side (img/s, or ms for latency)."""

    model: str
    task: str
    batch_size: int
    unit: str
    vitlab: float
    timm: float | None = None
    ratio: float | None = None  # vitlab / timm speed, median of per-round ratios
    mfu_vitlab: float | None = None
    mfu_timm: float | None = None
    peak_mem_mb_vitlab: float | None = None
    peak_mem_mb_timm: float | None = None
    max_abs_diff: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----- device helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(name: str) -> torch.device:
    """The device of ``--device`` (:func:`vitlab.devices.resolve_device`); benchmarks know the CPU and CUDA only."""
    device = resolve_device(name)
    if device.type not in ("cpu", "cuda"):
        raise VitlabError(f"--device must be cpu or cuda, got {name!r}")
    return device


def measure_gemm_rate(device: torch.device, dtype: str = "fp32", size: int = 2048, repeats: int = 5) -> dict:
    """Dense matrix-product rate in FLOP/s on ``device`` (best of ``repeats``): on the CPU both the BLAS path of
    ``torch.mm`` and oneDNN's (the faster is the machine's attainable peak); on CUDA ``torch.mm`` in the dtype."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" and device.type == "cuda" else torch.float32
    if device.type == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    candidates = {"blas": lambda: torch.mm(a, b)}
    if device.type == "cpu" and onednn_linear_available():
        candidates["onednn"] = lambda: onednn_product(a, b)
    rates = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fn()
            _sync(device)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                _sync(device)
                best = min(best, time.perf_counter() - start)
            rates[name] = 2 * size**3 / best
    rates["peak"] = max(rates.values())
    return rates


@contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at the null device: the profiler's C++ side (Kineto) writes status lines there
    ("USDT: ... profiler_start", "gpuGetDeviceCount failed" on a machine without a GPU) at every start, whatever
    its log level; Python exceptions are unaffected (raised, not written)."""
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to silence
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory that one call of ``fn`` allocates on top of what exists before it: CUDA from the caching
    allocator's statistics, CPU from the profiler's allocation records."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _native_stderr_silenced():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    changes = []
    for event in prof.events():
        own = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if own:
            changes.append((event.time_range.start, own))
    current = peak = 0
    for _, delta in sorted(changes, key=lambda c: c[0]):
        current += delta
        peak = max(peak, current)
    return peak


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, iters: int, device: torch.device,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round; the functions take turns within every round, in
    reversed order every other round (going first or second in a round must not favour one side)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for index in range(rounds):
        for name, fn in order if index % 2 == 0 else order[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / iters)
    return times


def paired_ratio(faster_if_small: list[float], reference: list[float]) -> float:
    """Median over rounds of reference time / candidate time (> 1: the candidate is faster)."""
    return statistics.median(r / c for c, r in zip(faster_if_small, reference))


# ----- model pairs

def build_pair(name: str, settings: BenchSettings, device: torch.device):
    """The vitlab model and, when timm is installed and knows the architecture, timm's with the same weights."""
    overrides = {"img_size": settings.img_size} if settings.img_size else {}
    if settings.depth:
        overrides["depth"] = settings.depth  # the same keyword on the timm side
    model = set_onednn_linear(create_model(name, **overrides))  # as vitlab.create_model builds it
    reference = None
    timm_name = TIMM_NAMES.get(name)
    if settings.timm and timm_name:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None:
            cfg = model.cfg
            reference = timm.create_model(timm_name, pretrained=False, num_classes=cfg.num_classes,
                                          img_size=cfg.img_size, depth=cfg.depth)
            model.load_state_dict(reference.state_dict(), strict=True)
            reference = reference.to(device)
    model = model.to(device)
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
        if reference is not None:
            reference.set_grad_checkpointing(True)
    return model, reference


def _maybe_compile(model: nn.Module, settings: BenchSettings) -> nn.Module:
    return torch.compile(model) if settings.compile else model


def _inference_fn(model, x, settings, device):
    def run():
        with torch.inference_mode(), autocast(device, settings.dtype):
            return model(x)

    return run


def _train_fn(model, x, y, settings, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def step():
        with autocast(device, settings.dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _mfu(macs: int, passes: int, img_per_s: float, peak: float) -> float:
    return 2 * passes * macs * img_per_s / peak


def bench_model(name: str, tasks: tuple[str, ...], settings: BenchSettings, gemm: dict,
                log: Callable[[str], None] = lambda s: None,
                on_result: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Measure ``tasks`` (see :data:`TASKS`) for one registered model; one :class:`Result` per task, each also
    passed to ``on_result`` as soon as it is measured."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise VitlabError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    device = bench_device(settings.device)
    if settings.dtype not in ("fp32", "bf16"):
        raise VitlabError(f"--dtype must be fp32 or bf16, got {settings.dtype!r}")
    get_config(name)  # a clear error for unknown names before anything is built
    torch.manual_seed(0)
    model, reference = build_pair(name, settings, device)
    cfg = model.cfg
    macs = forward_macs(cfg)
    peak = gemm["peak"]
    results = []
    shape = (cfg.in_chans, *cfg.img_size)
    # training changes the weights: measure it last, the largest batch (training too, alone in memory) after it
    for task in sorted(tasks, key=lambda t: (t == "max-batch", t == "train", TASKS.index(t))):
        if task == "int8" and device.type != "cpu":
            log(f"{name}: int8 runs on the CPU only; skipped on {device}")
            continue
        if task == "train" and settings.dtype == "bf16" and device.type == "cpu":
            log(f"{name}: bf16 autocast training on the CPU is not benchmarked; skipped")
            continue
        batch = 1 if task == "latency" else (settings.train_batch_size or settings.batch_size) if task == "train" \
            else settings.batch_size
        x = torch.randn((batch, *shape), device=device)
        log(f"{name}: {task}, batch {batch}")
        if task in ("inference", "latency"):
            model.eval()
            sides = {"vitlab": _inference_fn(_maybe_compile(model, settings), x, settings, device)}
            if reference is not None:
                reference.eval()
                sides["timm"] = _inference_fn(_maybe_compile(reference, settings), x, settings, device)
            results.append(_measure(name, task, batch, sides, settings, device, macs, 1, peak))
        elif task == "train":
            y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device)
            model.train()
            sides = {"vitlab": _train_fn(_maybe_compile(model, settings), x, y, settings, device)}
            if reference is not None:
                reference.train()
                sides["timm"] = _train_fn(_maybe_compile(reference, settings), x, y, settings, device)
            results.append(_measure(name, task, batch, sides, settings, device, macs, 3, peak, compare=False))
        elif task == "int8":
            results.append(_measure_int8(name, model, reference, x, settings, device, macs, peak))
        elif task == "max-batch":
            del x
            reference = None  # the timm model is not searched; its memory is given back first
            results.append(measure_max_batch(name, model, settings, device, log))
        on_result(results[-1])
    return results


def _measure(name, task, batch, sides, settings, device, macs, passes, peak, compare=True) -> Result:
    diff = None
    if compare and "timm" in sides:
        a, b = sides["vitlab"](), sides["timm"]()
        diff = float((a.float() - b.float()).abs().max())
    times = interleaved_times(sides, settings.rounds, settings.iters, device, settings.warmup)
    memory = {}
    if settings.memory:
        for side, fn in sides.items():
            memory[side] = peak_memory_bytes(fn, device) / 2**20
    med = {side: statistics.median(t) for side, t in times.items()}
    has_timm = "timm" in times
    if task == "latency":
        result = Result(name, task, batch, "ms", med["vitlab"] * 1e3, med["timm"] * 1e3 if has_timm else None)
    else:
        speed = {side: batch / t for side, t in med.items()}
        result = Result(name, task, batch, "img/s", speed["vitlab"], speed.get("timm"),
                        mfu_vitlab=_mfu(macs, passes, speed["vitlab"], peak),
                        mfu_timm=_mfu(macs, passes, speed["timm"], peak) if has_timm else None)
    if has_timm:
        result.ratio = paired_ratio(times["vitlab"], times["timm"])
    result.peak_mem_mb_vitlab = memory.get("vitlab")
    result.peak_mem_mb_timm = memory.get("timm")
    result.max_abs_diff = diff
    result.extra = {"rounds_s": {side: [round(t, 5) for t in ts] for side, ts in times.items()}}
    return result


def _measure_int8(name, model, reference, x, settings, device, macs, peak) -> Result:
    """vitlab int8 (ONNX Runtime dynamic quantisation of the Linear layers) against timm in float32; timm with
    PyTorch's deprecated dynamic quantisation is timed too, as an extra reference."""


    model = model.eval()
    with tempfile.TemporaryDirectory() as folder:
        fp32_path = export_onnx(model, Path(folder) / "model.onnx")
        int8_path = quantize_int8(fp32_path, Path(folder) / "model_int8.onnx")
        int8 = OnnxModel(int8_path, threads=settings.threads)
    sides = {"vitlab": lambda: int8(x)}
    with torch.inference_mode():
        expected = model(x)
    diff = float((int8(x) - expected).abs().max())
    if reference is not None:
        reference.eval()
        sides["timm"] = _inference_fn(reference, x, settings, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference_int8 = torch.ao.quantization.quantize_dynamic(reference, {nn.Linear}, dtype=torch.qint8)
        sides["timm_int8_torch_ao"] = _inference_fn(reference_int8, x, settings, device)
    times = interleaved_times(sides, settings.rounds, settings.iters, device, settings.warmup)
    batch = x.shape[0]
    speed = {side: batch / statistics.median(t) for side, t in times.items()}
    result = Result(name, "int8", batch, "img/s", speed["vitlab"], speed.get("timm"),
                    mfu_vitlab=_mfu(macs, 1, speed["vitlab"], peak), max_abs_diff=diff)
    if "timm" in times:
        result.ratio = paired_ratio(times["vitlab"], times["timm"])
        result.mfu_timm = _mfu(macs, 1, speed["timm"], peak)
        result.extra["timm_int8_torch_ao_img_s"] = speed["timm_int8_torch_ao"]
        result.extra["ratio_vs_timm_int8_torch_ao"] = paired_ratio(times["vitlab"], times["timm_int8_torch_ao"])
    result.extra["rounds_s"] = {side: [round(t, 5) for t in ts] for side, ts in times.items()}
    return result


# ----- the largest training batch

def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, deadline: float,
                    tolerance: float = 1 / 32) -> dict:
    """The largest ``n`` in [1, ``limit``] with ``fits(n)`` (assumed monotone: what fits, fits when smaller).

    Steps of x1.25 up (or x0.8 down) from ``start`` until a fitting and a failing size bracket the answer, then
    bisection until the bracket is within ``tolerance`` of the answer (or 1) or ``time.monotonic()`` passes
    ``deadline``. Returns ``largest`` (fits; 0 when even 1 did not), ``failed`` (the smallest size seen failing,
    None if none), ``tries`` ([size, fits] in order) and ``timed_out``."""
    fitting, failing = 0, None
    n = min(max(1, start), limit)
    tries: list[list] = []
    timed_out = False
    while True:
        if time.monotonic() > deadline:
            timed_out = True
            break
        ok = bool(fits(n))
        tries.append([n, ok])
        if ok:
            fitting = n
        else:
            failing = n
        if fitting == limit or failing == 1:
            break
        if failing is not None and failing - fitting <= max(1, int(fitting * tolerance)):
            break
        if failing is None:
            n = min(limit, max(n + 1, int(n * 1.25)))
        elif fitting == 0:
            n = max(1, min(n - 1, int(n * 0.8)))
        else:
            n = (fitting + failing) // 2
    return {"largest": fitting, "failed": failing, "tries": tries, "timed_out": timed_out}


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def measure_max_batch(name: str, model: nn.Module, settings: BenchSettings, device: torch.device,
                      log: Callable[[str], None] = lambda s: None) -> Result:
    """The largest training batch of ``model`` (AdamW step, ``settings.dtype`` autocast, checkpointing as set) that
    fits: on CUDA one that runs without an out-of-memory error (in ``memory_limit_mb`` when given, enforced with
    the allocator's per-process fraction), on the CPU one whose measured peak stays within ``memory_limit_mb``
    (required there: the CPU does not fail cleanly). The search starts at the analytic estimate
    (:func:`vitlab.compute.memory.max_micro_batch`) and is bounded by ``max_batch_seconds``."""
    if device.type == "cpu" and not settings.memory_limit_mb:
        raise VitlabError("the max-batch task on the CPU needs --memory-limit-mb (the memory to fit in): the CPU "
                          "does not fail cleanly when it runs out")
    cfg = model.cfg
    shape = (cfg.in_chans, *cfg.img_size)
    model.train()
    model.set_grad_checkpointing(settings.grad_checkpointing)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
    limit_bytes = settings.memory_limit_mb * 2**20 if settings.memory_limit_mb else total
    if device.type == "cuda" and settings.memory_limit_mb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(batch: int) -> None:
        x = torch.randn((batch, *shape), device=device)
        y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device)
        with autocast(device, settings.dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    peaks: dict[int, float] = {}

    def fits(batch: int) -> bool:
        start = time.perf_counter()
        failed = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step(batch)
                peak = torch.cuda.max_memory_allocated(device)
            else:
                peak = peak_memory_bytes(lambda: step(batch), device) + state_bytes
        except Exception as exc:  # only running out of memory is an answer; anything else is raised again
            if not _is_out_of_memory(exc):
                raise
            failed = type(exc).__name__
        if failed is not None:  # out of the except block: the traceback's frames (holding the batch) are gone
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"{name}: batch {batch} does not fit ({failed}, {time.perf_counter() - start:.1f} s)")
            return False
        ok = peak <= limit_bytes
        peaks[batch] = peak / 2**20
        log(f"{name}: batch {batch} {'fits' if ok else 'is over the limit'}: peak {peak / 2**20:.0f} MB "
            f"({time.perf_counter() - start:.1f} s)")
        return ok

    try:
        step(1)  # the optimiser's state and the libraries' workspaces exist before any size is judged
        state_bytes = sum(t.numel() * t.element_size() for p in model.parameters()
                          for t in [p, *optimizer.state[p].values()] if isinstance(t, torch.Tensor))
        estimate = 8
        if isinstance(cfg, ViTConfig):
            n_params = sum(p.numel() for p in model.parameters())
            estimate = max_micro_batch(cfg, n_params, limit_bytes, bf16=settings.dtype == "bf16",
                                       checkpointing=settings.grad_checkpointing)
        search = largest_fitting(fits, estimate, settings.max_batch_limit,
                                 time.monotonic() + settings.max_batch_seconds)
    finally:
        if device.type == "cuda" and settings.memory_limit_mb:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    largest = search["largest"]
    log(f"{name}: largest training batch {largest}" + (" (search stopped by its time limit)"
                                                        if search["timed_out"] else ""))
    result = Result(name, "max-batch", largest, "img", float(largest), peak_mem_mb_vitlab=peaks.get(largest))
    result.extra = {"grad_checkpointing": settings.grad_checkpointing, "estimate": estimate,
                    "limit_mb": limit_bytes / 2**20, **search}
    return result


def run_benchmarks(models: list[str], tasks: tuple[str, ...], settings: BenchSettings,
                   log: Callable[[str], None] = lambda s: None,
                   on_report: Callable[[dict], None] = lambda r: None) -> dict:
    """Measure the GEMM rate, then every task for every model. Returns a JSON-ready dict: environment, gemm
    rates (FLOP/s) and one row per (model, task). ``on_report`` gets the report so far (``complete`` False) after
    each row, so that a run stopped half-way (a time limit, a crash) keeps what it measured."""
    device = bench_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    env = _environment(device)
    peak_flops = settings.peak_flops
    if peak_flops is None and device.type == "cuda":
        peak_flops = datasheet_peak_flops(env["device_name"], settings.dtype)
    gemm = measure_gemm_rate(device, settings.dtype, settings.gemm_size, repeats=10)
    log("GEMM rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items()))
    rows = []

    def partial(result: Result) -> None:
        rows.append(_with_peak_mfu(result.to_dict(), gemm["peak"], peak_flops))
        on_report({"settings": asdict(settings), "environment": env, "gemm_flops": gemm, "peak_flops": peak_flops,
                   "results": rows, "complete": False})

    for name in models:
        bench_model(name, tasks, settings, gemm, log, on_result=partial)
    # a machine shared with other jobs can be slow at the start: measure again and keep the better rate, so that MFU
    # is never flattered by a low denominator; MFU is recomputed if the rate rose
    again = measure_gemm_rate(device, settings.dtype, settings.gemm_size, repeats=10)
    if again["peak"] > gemm["peak"]:
        scale = gemm["peak"] / again["peak"]
        for row in rows:
            for key in ("mfu_vitlab", "mfu_timm"):
                if row[key] is not None:
                    row[key] *= scale
    gemm = {key: max(gemm.get(key, 0.0), again.get(key, 0.0)) for key in again}
    env["threads"] = torch.get_num_threads()
    return {"settings": asdict(settings), "environment": env, "gemm_flops": gemm, "peak_flops": peak_flops,
            "results": rows, "complete": True}


def _with_peak_mfu(row: dict, gemm_peak: float, peak_flops: float | None) -> dict:
    """The row with its MFU against ``peak_flops`` too (``mfu_peak_vitlab`` / ``mfu_peak_timm``; None without
    one): the same model FLOPs per second, over the datasheet's peak instead of the measured GEMM rate."""
    for side in ("vitlab", "timm"):
        mfu = row[f"mfu_{side}"]
        row[f"mfu_peak_{side}"] = mfu * gemm_peak / peak_flops if mfu is not None and peak_flops else None
    return row


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
           "cuda": torch.version.cuda if device.type == "cuda" else None}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or "cpu"


def format_table(report: dict) -> str:
    """The results as a fixed-width text table."""
    gemm = report["gemm_flops"]
    peak = report.get("peak_flops")
    head = "GEMM rate: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items())
    if peak:
        head += f"; datasheet peak {peak / 1e12:.0f} TFLOP/s (MFU pk: against it)"
    lines = [head,
             f"{'model':<10} {'task':<10} {'batch':>5} {'unit':>6} {'vitlab':>9} {'timm':>9} {'ratio':>6} "
             f"{'MFU':>6} {'MFU timm':>8} {'mem MB':>8} {'timm MB':>8}" + (f" {'MFU pk':>6} {'pk timm':>7}"
                                                                          if peak else "")]

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    def pct(v, width):
        return f"{num(v and 100 * v, f'{width - 1}.1f'):>{width - 1}}%"

    for r in report["results"]:
        if r["task"] == "max-batch":
            extra = r["extra"]
            lines.append(f"{r['model']:<10} {r['task']:<10} {r['batch_size']:>5} {r['unit']:>6} "
                         f"largest training batch{' with checkpointing' if extra['grad_checkpointing'] else ''}"
                         f" (estimate {extra['estimate']}, first failing {extra['failed'] or '-'}, "
                         f"{len(extra['tries'])} tries{', time limit' if extra['timed_out'] else ''}); "
                         f"peak {num(r['peak_mem_mb_vitlab'], '.0f')} MB")
            continue
        line = (f"{r['model']:<10} {r['task']:<10} {r['batch_size']:>5} {r['unit']:>6} {r['vitlab']:>9.2f} "
                f"{num(r['timm'], '9.2f'):>9} {num(r['ratio'], '6.2f'):>6} {pct(r['mfu_vitlab'], 6)} "
                f"{pct(r['mfu_timm'], 8)} {num(r['peak_mem_mb_vitlab'], '8.0f'):>8} "
                f"{num(r['peak_mem_mb_timm'], '8.0f'):>8}")
        if peak:
            line += f" {pct(r.get('mfu_peak_vitlab'), 6)} {pct(r.get('mfu_peak_timm'), 7)}"
        lines.append(line)
        if r["task"] == "int8" and "timm_int8_torch_ao_img_s" in r["extra"]:
            lines.append(f"{'':<10} {'':<10} {'':>5} {'':>6} timm int8 (torch.ao, deprecated): "
                         f"{r['extra']['timm_int8_torch_ao_img_s']:.2f} img/s, vitlab int8 / that = "
                         f"{r['extra']['ratio_vs_timm_int8_torch_ao']:.2f}")
    return "\n".join(lines)
