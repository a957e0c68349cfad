"""benchmarks/gpu_suite.py: its dry run runs every step on the CPU and writes the JSON and the Markdown table with
numbers; a step that fails is recorded and the others still run; a child past its time limit is stopped."""

import argparse
import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .train_runs import child_env

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ("test_autocast_logits_match_the_cpu_float32_logits", "test_training_step_matches_the_cpu_float32_step",
             "test_attention_runs_on_the_flash_or_memory_efficient_kernel", "test_compiled_inference_matches_eager",
             "test_compiled_training_step_matches_eager",
             "test_fsdp_over_one_gpu_trains_the_weights_of_the_plain_model",
             "test_gradient_checkpointing_saves_the_expected_activation_memory",
             "test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one",
             "test_image_text_zero_shot_logits_match_the_cpu_float32_logits")


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_suite", None)


def test_the_dry_run_runs_every_step_and_reports_their_numbers(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    [json_file] = tmp_path.glob("gpu-suite-*-dry-run.json")
    check_dry_run_report(json_file)


def check_dry_run_report(json_file: Path) -> None:
    """Every step of a dry run's report ran and measured what it should (its Markdown beside it too)."""
    report = json.loads(json_file.read_text())
    markdown = json_file.with_suffix(".md").read_text()
    steps = report["steps"]
    assert report["dry_run"] and list(steps) == ["tests", "bench", "max_batch", "main_job"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "ok")
    assert all(step["seconds"] > 0 and step["budget_s"] > 0 for step in steps.values())

    tests = steps["tests"]["results"]
    assert tests["failed"] == 0 and tests["passed"] >= len(GPU_TESTS)
    assert {t["name"].split("[")[0] for t in tests["tests"]} == set(GPU_TESTS)
    measured = {t["name"]: t["measured"] for t in tests["tests"]}
    bf16 = measured["test_autocast_logits_match_the_cpu_float32_logits[bf16]"]
    assert 0 < bf16["rel_error"] <= bf16["tolerance"] == 4e-2
    memory = measured["test_gradient_checkpointing_saves_the_expected_activation_memory"]
    assert 0.7 <= memory["ratio"] <= 1.3 and memory["saved_mb"] > 0
    assert measured["test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one"]["tensors_differing"] == 0

    runs = {run["label"]: run for run in steps["bench"]["results"]["runs"]}
    assert set(runs) == {"eager", "compiled"} and all(run["complete"] for run in runs.values())
    rows = {(label, r["task"]): r for label, run in runs.items() for r in run["report"]["results"]}
    assert set(rows) == {("eager", "train"), ("compiled", "inference"), ("compiled", "train")}
    for row in rows.values():
        assert row["model"] == "vit_ti16" and row["vitlab"] > 0 and row["timm"] > 0 and row["ratio"] > 0
        assert 0 < row["mfu_vitlab"] < 1
    assert rows["compiled", "inference"]["max_abs_diff"] < 1e-4  # same weights on both sides
    assert all(run["report"]["gemm_flops"]["peak"] > 0 for run in runs.values())

    searches = {run["label"]: run["report"]["results"][0] for run in steps["max_batch"]["results"]["runs"]}
    plain, checkpointed = searches["plain"]["extra"], searches["checkpointing"]["extra"]
    assert 0 < plain["largest"] < checkpointed["largest"]  # recomputing the blocks leaves room for more images
    for search in searches.values():
        extra = search["extra"]
        # bracketed: the first failing batch within the search's resolution (1/32) above the answer
        assert not extra["timed_out"] and extra["largest"] < extra["failed"] <= extra["largest"] * 33 / 32 + 1
        assert search["peak_mem_mb_vitlab"] <= extra["limit_mb"]

    job = steps["main_job"]["results"]
    assert job["steps"] == 3 and 0 <= job["top1"] <= 1 and job["train_seconds"] > 0
    assert 0 < job["data_wait_share"] < 1 and job["images_per_s"] > 0

    for heading in ("## Tests: `pytest -m gpu` (", "## vitlab against timm, same process",
                    "## Largest training batch", "## Main job: `vitlab train --recipe fashion-mnist"):
        assert heading in markdown
    for name in steps:
        assert f"| {name} | ok |" in markdown
    assert "| vit_ti16 | compiled | inference | 2 |" in markdown and "| vit_fmnist | yes |" in markdown
    assert "## Failures" not in markdown


def test_a_failing_step_is_recorded_and_the_next_step_still_runs(suite, tmp_path, monkeypatch):
    def broken(plan, work, timeout):
        raise RuntimeError("boom in the bench step")

    monkeypatch.setattr(suite, "environment", lambda plan: {"device_name": "Test GPU", "cpu": "test cpu"})
    monkeypatch.setattr(suite, "step_bench", broken)
    monkeypatch.setattr(suite, "step_max_batch", lambda plan, work, timeout: {
        "status": "failed", "error": "the end of its output", "results": {"runs": []}})
    args = argparse.Namespace(dry_run=False, deadline=None, steps=["bench", "max_batch"], out=str(tmp_path),
                              main_job_args=None, data_dir=None)
    report = suite.run_suite(args)
    bench, max_batch = report["steps"]["bench"], report["steps"]["max_batch"]
    assert bench["status"] == "error" and "RuntimeError: boom in the bench step" in bench["error"]
    assert max_batch["status"] == "failed" and max_batch["budget_s"] == suite.GPU_PLAN.budgets["max_batch"]
    saved = json.loads((tmp_path / "gpu-suite-test-gpu.json").read_text())
    assert saved["steps"] == report["steps"]
    markdown = (tmp_path / "gpu-suite-test-gpu.md").read_text()
    assert "### bench: error" in markdown and "boom in the bench step" in markdown
    assert "### max_batch: failed" in markdown and "the end of its output" in markdown


def test_the_main_job_gets_the_data_folder_as_an_absolute_path(suite, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(suite, "environment", lambda plan: {"device_name": "Test GPU", "cpu": "test cpu"})
    monkeypatch.setattr(suite, "step_main_job", lambda plan, work, timeout, data_dir, dry_run, extra: seen.append(
        data_dir) or {"status": "failed", "error": "not run"})
    monkeypatch.chdir(tmp_path)  # the main job's child runs in the repository root, not here
    args = argparse.Namespace(dry_run=False, deadline=None, steps=["main_job"], out=str(tmp_path / "out"),
                              main_job_args=None, data_dir=".suite_data/fashion-mnist")
    suite.run_suite(args)
    assert seen == [tmp_path / ".suite_data" / "fashion-mnist"]


def test_a_child_past_its_time_limit_is_stopped_and_its_output_kept(suite):
    start = time.monotonic()
    child = suite.run_child([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                            timeout=2, env=child_env(), label="sleeper")
    assert child.returncode is None and suite._status(child) == "timeout"
    assert "started" in child.tail and time.monotonic() - start < 30


@pytest.mark.slow
def test_a_tests_step_stopped_at_its_time_limit_keeps_the_results_of_the_finished_tests(suite, tmp_path):
    # pytest writes its JUnit file only when its session ends: the stop must end the session, not the process
    test_file = tmp_path / "test_stopped.py"
    test_file.write_text("import time\n\nimport pytest\n\npytestmark = pytest.mark.gpu\n\n\n"
                         "def test_done(record_property):\n    record_property('rel_error', 0.25)\n\n\n"
                         "def test_stuck():\n    time.sleep(120)\n")
    plan = dataclasses.replace(suite.DRY_PLAN, test_files=[str(test_file)], env={})
    start = time.monotonic()
    out = suite.step_tests(plan, tmp_path, timeout=8)
    assert out["status"] == "timeout" and time.monotonic() - start < 30
    tests = {t["name"]: t for t in out["results"]["tests"]}
    assert list(tests) == ["test_done"] and tests["test_done"]["measured"] == {"rel_error": 0.25}
    assert out["command"].startswith("pytest -m gpu ")


def test_junit_results_give_outcomes_messages_and_recorded_numbers(suite, tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a[bf16]" time="1.25"><properties>
<property name="rel_error" value="0.0123" /><property name="peak_mb" value="{'False': 10.5}" />
<property name="note" value="not a literal" /></properties></testcase>
<testcase classname="tests.test_gpu" name="test_b" time="0.5"><failure message="assert 0.2 &lt;= 0.1">trace
line</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="no fp16 yet" /></testcase>
</testsuite></testsuites>""")
    tests = {t["name"]: t for t in suite.parse_junit(path)["tests"]}
    assert tests["test_a[bf16]"]["outcome"] == "passed" and tests["test_a[bf16]"]["seconds"] == 1.25
    assert tests["test_a[bf16]"]["measured"] == {"rel_error": 0.0123, "peak_mb": {"False": 10.5},
                                                 "note": "not a literal"}
    assert tests["test_b"]["outcome"] == "failed" and "assert 0.2 <= 0.1" in tests["test_b"]["message"]
    assert tests["test_c"]["outcome"] == "skipped" and tests["test_c"]["message"] == "no fp16 yet"


# gpu-marked tests the GPU plan leaves out, and why
NOT_IN_THE_GPU_PLAN = {"tests/test_bench.py": "the bench step runs the same comparison with timm at full size"}


def test_the_gpu_plan_runs_every_test_that_needs_cuda(suite):
    """A test that skips without CUDA is marked gpu (``pytest -m gpu`` selects it), and its file is one the GPU
    plan's tests step runs: the suite is the only place such a test ever runs."""
    marked = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        module_gpu = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
                         and "mark.gpu" in ast.get_source_segment(source, n.value) for n in tree.body)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            decorators = [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
            needs_cuda = any("skipif(not torch.cuda.is_available()" in d for d in decorators)
            gpu = module_gpu or any(d.endswith("mark.gpu") for d in decorators)
            assert gpu or not needs_cuda, f"{path.name}::{node.name} needs CUDA but is not marked gpu"
            if gpu:
                marked.add(f"tests/{path.name}")
    assert "tests/test_gpu.py" in marked and "tests/test_train_precision.py" in marked
    assert marked - set(NOT_IN_THE_GPU_PLAN) == set(suite.GPU_PLAN.test_files)
