"""vitlab bench: the timing and memory machinery, one end-to-end CPU run against timm, the CLI and its errors."""

import json

import pytest
import torch

from vitlab.cli import main
from vitlab.compute.bench import (
    BenchSettings,
    bench_model,
    datasheet_peak_flops,
    interleaved_times,
    largest_fitting,
    measure_gemm_rate,
    paired_ratio,
    peak_memory_bytes,
)
from vitlab.errors import VitlabError

timm = pytest.importorskip("timm")


def test_rounds_alternate_between_sides_and_which_goes_first_after_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved_times(fns, rounds=3, iters=2, device=torch.device("cpu"), warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert [len(t) for t in times.values()] == [3, 3]


def test_paired_ratio_is_median_of_per_round_speed_ratios():
    # round 2 is disturbed for both sides alike; the per-round ratio stays 2
    assert paired_ratio([1.0, 5.0, 1.0], [2.0, 10.0, 2.0]) == 2.0
    assert paired_ratio([1.0, 1.0, 4.0], [1.0, 3.0, 2.0]) == 1.0


def test_cpu_peak_memory_follows_allocations_and_frees():
    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(2048, 1024)  # 8 MiB: 12 live
        del a
        c = torch.ones(512, 1024)  # 2 MiB: 10 live
        return b, c

    peak = peak_memory_bytes(work, torch.device("cpu")) / 2**20
    assert 11.9 < peak < 12.5


def test_cpu_peak_memory_prints_nothing_of_the_profilers_own():
    # the profiler's C++ side writes "USDT: ... profiler_start" and, without a GPU, a gpuGetDeviceCount error line
    # to descriptor 2 at every start; vitlab bench's output must be its own
    import subprocess
    import sys

    code = ("import torch\nfrom vitlab.compute.bench import peak_memory_bytes\n"
            "print(peak_memory_bytes(lambda: torch.ones(256, 1024), torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and int(done.stdout) >= 2**20
    assert done.stderr == "", done.stderr


@pytest.mark.parametrize("start", [1, 20, 37, 38, 500, 4096])
def test_largest_fitting_brackets_the_answer_from_any_start(start):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 37

    search = largest_fitting(fits, start, limit=4096, deadline=float("inf"), tolerance=0)
    assert search["largest"] == 37 and search["failed"] == 38 and not search["timed_out"]
    assert [n for n, _ in search["tries"]] == tried and len(tried) == len(set(tried)) <= 40


def test_largest_fitting_stops_at_the_limit_the_deadline_or_when_nothing_fits():
    assert largest_fitting(lambda n: True, 10, limit=64, deadline=float("inf"))["largest"] == 64
    nothing = largest_fitting(lambda n: False, 10, limit=64, deadline=float("inf"))
    assert nothing["largest"] == 0 and nothing["failed"] == 1
    late = largest_fitting(lambda n: True, 10, limit=64, deadline=0.0)
    assert late["timed_out"] and late["tries"] == [] and late["largest"] == 0
    coarse = largest_fitting(lambda n: n <= 1000, 700, limit=4096, deadline=float("inf"), tolerance=1 / 32)
    assert 1000 - 1000 // 32 <= coarse["largest"] <= 1000 < coarse["failed"] <= coarse["largest"] + 1000 // 32


def test_datasheet_peaks_are_dense_bf16_and_the_most_specific_name_wins():
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert datasheet_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert datasheet_peak_flops("NVIDIA H200", "bf16") == 989e12
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert datasheet_peak_flops("Some Other GPU", "bf16") is None


def test_max_batch_on_the_cpu_needs_a_memory_limit():
    # the search itself (CPU: measured peaks under --memory-limit-mb) runs in the GPU suite's dry run
    from vitlab.compute.bench import measure_max_batch
    from vitlab.models import create_model

    with pytest.raises(VitlabError, match="--memory-limit-mb"):
        measure_max_batch("vit_fmnist", create_model("vit_fmnist", depth=1), BenchSettings(), torch.device("cpu"))


def test_gemm_rate_is_positive_and_peak_is_the_best():
    rates = measure_gemm_rate(torch.device("cpu"), size=256, repeats=1)
    assert rates["peak"] == max(v for k, v in rates.items() if k != "peak") > 0


@pytest.mark.slow
def test_bench_model_against_timm_on_cpu():
    settings = BenchSettings(batch_size=2, img_size=32, rounds=1, warmup=0, memory=True)
    results = {r.task: r for r in bench_model("vit_ti16", ("train", "inference", "latency"), settings,
                                              {"peak": 1e11})}
    assert set(results) == {"inference", "latency", "train"}
    inference = results["inference"]
    assert inference.max_abs_diff is not None and inference.max_abs_diff < 1e-4  # same weights, same function
    assert inference.timm > 0 and inference.vitlab > 0 and inference.ratio > 0
    assert 0 < inference.mfu_vitlab < 1
    assert results["latency"].unit == "ms" and results["latency"].batch_size == 1
    assert results["train"].peak_mem_mb_vitlab > 0 and results["train"].peak_mem_mb_timm > 0


@pytest.mark.slow
def test_cli_writes_json_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    status = main(["bench", "vit_ti16", "--img-size", "32", "--batch-size", "2", "--tasks", "inference",
                   "--rounds", "1", "--warmup", "0", "--no-memory", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["model"] == "vit_ti16" and report["gemm_flops"]["peak"] > 0
    assert "ratio" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["bench", "vit_ti16", "--tasks", "fly"], "unknown task"),
    (["bench", "vit_ti16", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "vit_ti16", "--max-batch-seconds", "0"], "--max-batch-seconds must be > 0"),
    (["bench", "vit_nope", "--tasks", "inference", "--no-timm"], "unknown model"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(capsys):
    assert main(["bench", "vit_ti16", "--device", "cuda", "--tasks", "inference"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_inference_and_training_against_timm():
    settings = BenchSettings(device="cuda", dtype="bf16", batch_size=4, rounds=2, warmup=1)
    results = {r.task: r for r in bench_model("vit_s16", ("inference", "train"), settings, {"peak": 1e14})}
    assert results["inference"].max_abs_diff < 0.1  # bf16 autocast on both sides
    assert results["train"].peak_mem_mb_vitlab > 0
