"""Helpers for tests that run ``vitlab train`` in a child process: its environment, killing it with SIGKILL at a
checkpointed step, and comparing the weights two runs wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def child_env(threads: int = 1) -> dict:
    """The environment of a child vitlab process: this checkout first on the path, ``threads`` OpenMP threads and no
    inherited torchrun world."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    return env


def same_tensors(a: Path, b: Path) -> list[str]:
    """The names whose tensors differ between two safetensors files (which must hold the same names)."""
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def train_and_kill(config_file: Path, run_dir: Path, kill_at: Callable[[int], bool], timeout: float,
                   poll: float = 0.05) -> int | None:
    """Run ``vitlab train --config config_file`` and SIGKILL it as soon as its ``run_dir/checkpoints/last.pt`` holds a
    step for which ``kill_at`` is true. Returns that step, or None when the run ended (or hung past ``timeout``
    seconds, and was then killed) first."""
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--config", str(config_file)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return kill_at_checkpoint(proc, run_dir, kill_at, timeout, poll)


def kill_at_checkpoint(proc: subprocess.Popen, run_dir: Path, kill_at: Callable[[int], bool], timeout: float,
                       poll: float = 0.05, kill: Callable[[subprocess.Popen], None] | None = None) -> int | None:
    """Kill the started training process ``proc`` (``kill``, default SIGKILL to it) as soon as
    ``run_dir/checkpoints/last.pt`` holds a step for which ``kill_at`` is true, and wait for it. Returns that step, or
    None when the run ended (or hung past ``timeout`` seconds, and was then killed) first."""
    kill = kill or (lambda p: p.send_signal(signal.SIGKILL))
    last = run_dir / "checkpoints" / "last.pt"
    killed_at, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                step = torch.load(last, map_location="cpu", weights_only=True)["step"]
            except Exception:  # caught between writes: try again
                step = 0
            if kill_at(step):
                kill(proc)
                killed_at = step
                break
        time.sleep(poll)
    if proc.poll() is None and killed_at is None:
        kill(proc)
    proc.wait()
    return killed_at
