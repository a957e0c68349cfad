"""Runs a user can trust: SIGKILL mid-epoch + resume ends with the weights of an uninterrupted run, a killed
checkpoint write keeps the previous checkpoint, and a two-process torchrun run trains, evaluates exactly and writes
one run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import vitlab
from vitlab.atomic import remove_stale_temporaries
from vitlab.train import TrainConfig, evaluate, train
from vitlab.train.checkpoint import atomic_torch_save
from vitlab.train.stop import StopSignals

from .test_evaluate_distributed import _free_port
from .test_train import tiny_config
from .train_runs import child_env, same_tensors, train_and_kill

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    # dropout, drop-path, Inception crops, flips and EMA: every kind of state a resumed run has to restore
    # 22 steps per epoch, checkpoints every 9 steps and at every epoch end
    cfg = tiny_config(tmp_path, epochs=12, deterministic=True, save_every_steps=9, eval_every_epochs=5,
                      augment="inception", crop_scale=(0.3, 1.0), ema_decay=0.99,
                      model_args={**tiny_config(tmp_path).model_args, "dropout": 0.1, "drop_path_rate": 0.1})
    total_steps = 12 * 22
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.replace(run_name="killed").to_json())
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.pt"
    # waits for a state (a mid-epoch checkpoint); the bound is only for a hang
    # kill while both this checkpoint and the next (9 steps on) are inside an epoch of 22 steps
    killed_at = train_and_kill(config_file, tmp_path / "runs" / "killed",
                               lambda step: step >= 90 and 3 <= step % 22 <= 12, timeout=600)
    assert killed_at is not None, "the run ended (or hung) before it could be killed"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert 90 <= state["step"] < total_steps and state["step"] % 22 != 0  # mid-epoch
    resumed = train(TrainConfig(threads=1), resume=tmp_path / "runs" / "killed")
    assert resumed.steps == total_steps
    reference = train(cfg.replace(run_name="reference"))
    assert same_tensors(resumed.model_path, reference.model_path) == []
    assert resumed.metrics == reference.metrics
    a = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "reference" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    # the metrics log keeps one row per step even though the killed run had logged past its last checkpoint
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == total_steps


def test_a_killed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1, "weights": torch.ones(3)}, path)
    script = f"""
import time, torch
from vitlab.train import checkpoint

def hanging_save(obj, f):
    f.write(b"PK\\x03\\x04 the first bytes of a zip archive")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

checkpoint.torch.save = hanging_save
checkpoint.atomic_torch_save({{"step": 2, "weights": torch.zeros(3)}}, {str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=child_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1  # the half-written temporary, never the checkpoint itself
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert remove_stale_temporaries(tmp_path) == leftovers and not leftovers[0].exists()


def test_resume_refuses_what_is_not_a_training_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(vitlab.errors.VitlabError, match="not a readable vitlab training checkpoint"):
        train(TrainConfig(), resume=tmp_path / "run")
    with pytest.raises(vitlab.errors.VitlabError, match="no checkpoint to resume from"):
        train(TrainConfig(), resume=tmp_path / "elsewhere")


def _torchrun(config_file: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "vitlab",
           "train", "--config", str(config_file), *extra]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,controls", [(False, {}), (True, {}), (True, {"freeze_blocks": 1, "layer_decay": 0.75})],
                         ids=["ddp", "fsdp", "fsdp-frozen-layer-decay"])
def test_torchrun_two_processes_train_evaluate_exactly_and_write_one_run(tmp_path, fsdp, controls):
    """Two processes equal one; with FSDP also when fine-tuning controls freeze parameters and give each layer its
    own learning rate (sharded parameters in per-layer optimiser groups)."""
    # SGD: without Adam's normalisation, summation-order differences stay at rounding level
    cfg = tiny_config(tmp_path, epochs=3, run_name="dist", eval_every_epochs=1, fsdp=fsdp, optimizer="sgd", lr=0.05,
                      **controls)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    done = _torchrun(config_file, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["dist"]  # rank 0 alone creates and writes the run
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    result = json.loads((runs[0] / "result.json").read_text())
    assert result["world_size"] == 2 and result["metrics"]["samples"] == 359  # 180 + 179: nothing padded
    assert "test accuracy" in done.stdout and done.stdout.count("run folder:") == 1
    if controls:
        assert "8,938 of 18,218 parameters train" in done.stdout + done.stderr
    # the distributed evaluation equals a single-process evaluation of the saved model
    model = vitlab.load(runs[0] / "model.safetensors")
    single = evaluate(model, "digits", device="cpu")
    assert single["top1"] == pytest.approx(result["metrics"]["top1"], abs=1e-12)
    assert single["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)
    # the same global batches as one process: the weights agree up to floating-point summation order
    one = train(cfg.replace(run_name="single", fsdp=False))
    a, b = load_file(one.model_path), load_file(runs[0] / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_the_main_recipe_on_one_and_two_processes_trains_the_same_weights(tmp_path):
    """30 steps of the main job's recipe (flips, patch dropout, AdamW) on 1 and on 2 processes: every draw is keyed
    by the sample, so the weights agree up to summation order, the attention key biases included (their gradient is
    zero in exact arithmetic and the step sets it to zero, so Adam cannot scale rounding noise up there)."""
    def train_on(nproc: int) -> Path:
        cmd = [sys.executable, "-m", "vitlab", "train", "--recipe", "fashion-mnist", "--steps", "30", "--set",
               "train_subset=3840", "--set", "holdout=500", "--deterministic", "--threads", "1", "--no-progress",
               "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--run-name", f"nproc{nproc}"]
        done = subprocess.run(cmd + (["--nproc", str(nproc)] if nproc > 1 else []), env=child_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / "runs" / f"nproc{nproc}" / "model.safetensors"

    one, two = train_on(1), train_on(2)
    a, b = load_file(one), load_file(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(one)(images), vitlab.load(two)(images), atol=1e-5, rtol=0)


def test_resume_auto_starts_a_named_run_then_continues_it(tmp_path, capsys):
    """The same call twice: the first starts the named run, the second finds it finished; a longer one continues
    it; other settings or a folder of other files are refused in one line."""
    from vitlab.train.runfolder import RunFinished

    cfg = tiny_config(tmp_path, epochs=None, steps=6, eval_every_epochs=0, run_name="job")
    first = train(cfg, resume="auto")
    assert first.steps == 6 and first.run_dir == tmp_path / "runs" / "job"
    with pytest.raises(RunFinished, match="has finished"):
        train(cfg, resume="auto")
    longer = train(cfg.replace(steps=9), resume="auto")
    assert longer.steps == 9 and longer.run_dir == first.run_dir
    assert "resumed from" in (first.run_dir / "log.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["job"]
    with pytest.raises(vitlab.errors.VitlabError, match="holds another run .*differs in lr"):
        train(cfg.replace(lr=0.1), resume="auto")
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "notes.txt").write_text("mine")
    with pytest.raises(vitlab.errors.VitlabError, match="is not a vitlab run folder"):
        train(cfg.replace(run_name="other"), resume="auto")


def test_resume_auto_from_the_environment_on_the_command_line(tmp_path, capsys, monkeypatch):
    from vitlab.cli import main as cli_main

    cfg = tiny_config(tmp_path, epochs=None, steps=4, eval_every_epochs=0, run_name="job")
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    monkeypatch.setenv("VITLAB_RESUME", "auto")
    assert cli_main(["train", "--config", str(config_file)]) == 0
    assert cli_main(["train", "--config", str(config_file), "--steps", "6"]) == 0
    assert json.loads((tmp_path / "runs" / "job" / "result.json").read_text())["steps"] == 6
    assert cli_main(["train", "--config", str(config_file), "--steps", "6"]) == 0
    assert "has finished" in capsys.readouterr().err
    monkeypatch.setenv("VITLAB_RESUME", "yes")
    assert cli_main(["train", "--config", str(config_file)]) == 2
    assert "VITLAB_RESUME=yes: takes auto" in capsys.readouterr().err


def _worker(launcher: subprocess.Popen, rank: int, timeout: float = 120):
    """The training process of ``rank`` started by the torchrun ``launcher`` (found by its RANK variable)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "vitlab" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process under torchrun")


def _checkpoint_step(last: Path) -> int:
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["step"])
    except Exception:  # not there yet, or caught between writes
        return -1


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_worker_joins_the_run_and_ends_bit_identical(tmp_path):
    """torchrun --max-restarts 1, SIGKILL of rank 1 after a checkpoint: the restarted processes find the folder this
    launch made (no fixed name: by the rendezvous id) and its step, and the run ends with the weights of a run that
    was never interrupted."""
    cfg = tiny_config(tmp_path, epochs=8, save_every_steps=10, eval_every_epochs=0, optimizer="sgd", lr=0.05,
                      model_args={**tiny_config(tmp_path).model_args, "dropout": 0.1})
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "--monitor-interval=0.2", "-m", "vitlab", "train", "--config", str(config_file)]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _worker(proc, 1)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "runs").glob("*/checkpoints/last.pt"))
        if runs and (step := _checkpoint_step(runs[0])) >= 20:
            victim.kill()
            killed_at = step
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert killed_at is not None and proc.returncode == 0, err[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # the restart joined the run folder instead of starting a new one
    log = (runs[0] / "log.txt").read_text()
    assert "resumed from" in log and json.loads((runs[0] / "result.json").read_text())["steps"] == 8 * 22
    reference_file = tmp_path / "reference.json"
    reference_file.write_text(cfg.replace(run_name="reference", out_dir=str(tmp_path / "ref")).to_json())
    reference = _torchrun(reference_file, 2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert same_tensors(runs[0] / "model.safetensors", tmp_path / "ref" / "reference" / "model.safetensors") == []


def test_sigterm_stops_at_the_step_boundary_and_the_same_call_continues_bit_identical(tmp_path, monkeypatch):
    """SIGTERM mid-step (as a scheduler sends it before preemption): the step finishes, last.pt is written, one line
    says so and RunStopped carries exit status 75; the same call again ends with the uninterrupted weights."""
    from vitlab.train import loop
    from vitlab.train.stop import EXIT_STOPPED, RunStopped

    cfg = tiny_config(tmp_path, epochs=None, steps=30, eval_every_epochs=0, run_name="job", ema_decay=0.9,
                      model_args={**tiny_config(tmp_path).model_args, "dropout": 0.1})
    real_step = loop.train_step

    def signalled_step(run, batches, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the step, which still completes
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", signalled_step)
    with pytest.raises(RunStopped) as stopped:
        train(cfg, resume="auto")
    assert stopped.value.exit_status == EXIT_STOPPED == 75 and stopped.value.step == 13
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the run's only
    run_dir = tmp_path / "runs" / "job"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 13
    log = (run_dir / "log.txt").read_text()
    assert log.count("stopped by SIGTERM at step 13/30") == 1 and not (run_dir / "result.json").exists()
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume="auto")
    reference = train(cfg.replace(run_name="reference"))
    assert resumed.steps == 30 and same_tensors(resumed.model_path, reference.model_path) == []


def _agree(rank: int, port: int, results) -> None:
    """Rank 1 receives SIGTERM before step boundary 2; each process records what agreed() says at each boundary."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop, seen = StopSignals(), []
        for boundary in range(6):
            if rank == 1 and boundary == 2:
                stop.received = signal.SIGTERM  # as its handler records it
            seen.append(stop.agreed())
            if seen[-1]:
                break
        results.put((rank, seen))
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_a_stop_signal_at_the_same_boundary_one_step_later():
    """The agreement started at one step boundary is read at the next (no step waits for it): the signal one
    process got before boundary 2 stops both at boundary 3."""
    ctx = mp.get_context("fork")
    results, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_agree, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = dict(results.get() for _ in procs)
    assert seen == {0: [0, 0, 0, signal.SIGTERM], 1: [0, 0, 0, signal.SIGTERM]}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one-worker", "launcher"])
def test_sigterm_to_a_two_process_run_stops_every_rank_and_the_same_command_continues(tmp_path, target):
    """SIGTERM to one of two processes (all agree to stop at the same step), or to the --nproc launcher (torchrun
    forwards it): exit 75 with one line, last.pt written; the same command again ends bit-identical to a two-process
    run that was never interrupted."""
    cfg = tiny_config(tmp_path, epochs=8, eval_every_epochs=0, run_name="job", optimizer="sgd", lr=0.05,
                      model_args={**tiny_config(tmp_path).model_args, "dropout": 0.1}, log_every_steps=2)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "vitlab", "train", "--config", str(config_file), "--resume", "auto", "--nproc", "2",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = _worker(proc, 1)
    metrics = tmp_path / "runs" / "job" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    (rank1 if target == "one-worker" else proc).send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert err.count("stopped by SIGTERM at step") == 1 and "Traceback" not in err, err[-3000:]
    last = torch.load(tmp_path / "runs" / "job" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < last["step"] < 8 * 22
    again = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    reference_file = tmp_path / "reference.json"
    reference_file.write_text(cfg.replace(run_name="reference").to_json())
    assert _torchrun(reference_file, 2).returncode == 0
    runs = tmp_path / "runs"
    assert same_tensors(runs / "job" / "model.safetensors", runs / "reference" / "model.safetensors") == []


@pytest.mark.slow
def test_a_killed_rank_is_named_in_one_line_without_a_traceback(tmp_path):
    """SIGKILL of rank 1 in a two-process run: rank 0's failed collective (gloo: "Connection closed by peer") is
    not shown; one line names the rank that ended, and the run exits 1."""
    cfg = tiny_config(tmp_path, epochs=8, eval_every_epochs=0, run_name="job", log_every_steps=2)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--config", str(config_file), "--nproc", "2",
                             "--device", "cpu"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    rank1 = _worker(proc, 1)
    metrics = tmp_path / "runs" / "job" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    rank1.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert err.count("rank 1 of 2 ended (killed, out of memory or its own error") == 1, err[-3000:]
    assert "Traceback" not in err and "Connection closed" not in err, err[-3000:]
    assert "rank 1 of 2 ended" in (tmp_path / "runs" / "job" / "log.txt").read_text()


def test_run_folder_names_the_files_a_run_writes_and_one_rule_gives_its_length(tmp_path):
    from vitlab.train.runfolder import RunFolder, total_steps_for

    run = train(tiny_config(tmp_path, epochs=None, steps=3, eval_every_epochs=0, run_name="job"))
    folder = RunFolder(run.run_dir)
    for path in (folder.config, folder.log, folder.metrics, folder.last, folder.model, folder.result):
        assert path.is_file(), path
    assert run.model_path == folder.model and not folder.file(RunFolder.SHARED_CHECK).exists()
    assert json.loads(folder.result.read_text())["steps"] == 3
    assert folder.stored_config()["steps"] == 3
    assert RunFolder.of_checkpoint(folder.last).path == run.run_dir
    assert RunFolder.resume_checkpoint(run.run_dir) == folder.last
    # steps win; else epochs (one when unset) of the epoch's steps, rounded up
    assert [total_steps_for(5, 2.0, 22), total_steps_for(None, 2.5, 22), total_steps_for(None, None, 22)] == [5, 55, 22]


def test_the_lines_that_name_the_nodes_that_see_another_run_folder():
    from vitlab.train.runfolder import disagreement, unseen_folder

    a, b = "node 0 (host-a)", "node 1 (host-b)"
    assert unseen_folder("runs/job", [(True, a), (True, a), (True, b)]) is None
    line = unseen_folder("runs/job", [(True, a), (True, a), (False, b), (False, b)])
    assert line.startswith("runs/job: the run folder that rank 0 made on node 0 (host-a) is not visible on node 1 "
                           "(host-b) ranks 2, 3; every node needs the run folder on one shared filesystem")
    assert "\n" not in line
    resumes = "resumes runs/job/checkpoints/last.pt at step 20"
    assert disagreement([(resumes, a), (resumes, b)]) is None
    line = disagreement([(resumes, a), ("stops (runs/job: no checkpoint to resume from)", b)])
    assert line.startswith(f"the processes do not see the same run: rank 0 on {a} {resumes}, while {b} rank 1 stops "
                           "(runs/job: no checkpoint to resume from); every node needs the run folder")


def _two_nodes(cwds: list[Path], *args: str, env: dict | None = None) -> list[tuple[int, str, float]]:
    """``vitlab train ARGS`` on a two-node torchrun world on loopback (static rendezvous, one process per node),
    each launcher in its own working directory: (exit status, stderr, seconds) per launcher."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "vitlab", "train", *args],
        cwd=cwd, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, cwd in enumerate(cwds)]
    done = []
    for launcher in launchers:
        _, err = launcher.communicate(timeout=180)
        done.append((launcher.returncode, err, time.monotonic() - t0))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shared", "new", "resume", "auto"])
def test_a_node_without_the_run_folder_stops_every_node_in_one_line(tmp_path, monkeypatch, case):
    """Two nodes on loopback, each launcher in its own working directory with a relative --out-dir, so node 1 does
    not see the folder node 0 writes (no shared filesystem): both launchers exit non-zero with one line naming node
    1, for a new run and for --resume / --resume auto of a run node 0 alone holds. With one working directory
    (shared) the run trains."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg = tiny_config(tmp_path, epochs=None, steps=2, eval_every_epochs=0, run_name="job", out_dir="runs")
    for where in (a, b):
        (where / "config.json").write_text(cfg.to_json())
    if case in ("resume", "auto"):  # node 0's run folder with a checkpoint; node 1 has none
        monkeypatch.chdir(a)
        train(cfg)
    args = {"resume": ["--resume", "runs/job", "--steps", "4"],  # --config may not be given with a named resume
            "auto": ["--config", "config.json", "--resume", "auto", "--steps", "4"]}
    args = args.get(case, ["--config", "config.json"])
    done = _two_nodes([a, a] if case == "shared" else [a, b], *args, env={"VITLAB_SHARED_WAIT": "1"})
    print("seconds to the end of each launcher:", [round(seconds, 1) for _, _, seconds in done])
    if case == "shared":
        assert [code for code, _, _ in done] == [0, 0], done[0][1][-3000:]
        assert json.loads((a / "runs" / "job" / "result.json").read_text())["world_size"] == 2
        assert not (a / "runs" / "job" / ".shared-check").exists()
        return
    expected = ("is not visible on node 1" if case == "new" else
                "the processes do not see the same run: rank 0 on node 0")
    for code, err, seconds in done:
        assert code != 0 and seconds < 120, err[-3000:]  # no hang: the start-up (imports) is most of it
        lines = [line for line in err.splitlines() if "vitlab train: error:" in line]
        assert len(lines) == 1 and expected in lines[0] and "node 1" in lines[0], err[-3000:]
        assert "vitlab/train/" not in err, err[-3000:]  # no traceback from the processes (torchrun's own follows)
        print(lines[0])
    if case == "new":
        assert not (a / "runs" / "job").exists() and not (b / "runs").exists()  # nothing left behind
    else:
        assert "at step 2" in lines[0] and json.loads((a / "runs" / "job" / "result.json").read_text())["steps"] == 2
