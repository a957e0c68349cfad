"""What may write into a run folder: positive identification for ``--resume`` and one process at a time.

A run folder is identified by what vitlab writes when it creates one: ``config.json`` (the resolved config, written
right after the folder is made) next to ``checkpoints/``. ``--resume`` writes into a folder only when the checkpoint
is ``RUN/checkpoints/<file>.pt`` and ``RUN/config.json`` is a training config describing the same run as the
checkpoint (every field but the runtime ones and the length). Folders written by earlier versions have the same two
things and are accepted as they are; anything else (a checkpoint copied into a backup folder, a folder of other
files) is refused before anything is written.

While a run trains, its main process holds an exclusive ``flock`` on ``RUN/run.lock``, which names the holder (pid,
host, start time); a second process that wants to write the same run refuses in one line naming it. The lock goes
with the process (also when it is killed), so a stale lock file never blocks a resume.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import VitlabError

LOCK_NAME = "run.lock"
# settings a resumed run takes from the command line (the rest comes from the checkpoint)
RUNTIME_FIELDS = ("device", "threads", "progress", "num_workers", "trackers")
LENGTH_FIELDS = ("epochs", "steps")


def run_folder_of(checkpoint: Path, train_config: dict | None = None) -> Path:
    """The run folder holding ``checkpoint``; refuses (one line, nothing written) a checkpoint that is not in a
    vitlab run folder, or one whose ``config.json`` describes another run than ``train_config`` (the checkpoint's)."""
    checkpoint = Path(checkpoint)
    where = checkpoint.resolve().parent
    run_dir = where.parent
    config_file = run_dir / "config.json"
    why = None
    if where.name != "checkpoints":
        why = f"it is not in a run folder's checkpoints/ folder ({where} is not)"
    elif not config_file.is_file():
        why = f"{config_file} is missing (vitlab writes it when it creates a run folder)"
    else:
        try:
            stored = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            stored = None
        if not isinstance(stored, dict) or "model" not in stored or "data" not in stored:
            why = f"{config_file} is not a vitlab training config"
        elif train_config is not None and (changed := _differences(stored, train_config)):
            why = (f"{config_file} describes another run than the checkpoint (they differ in "
                   f"{', '.join(changed[:4])})")
    if why:
        raise VitlabError(f"{checkpoint}: resume writes only into a vitlab run folder, and {why}; nothing was "
                          "written (copy the whole run folder to resume a copy)")
    return run_dir


def _differences(a: dict, b: dict) -> list[str]:
    """The fields (other than runtime and length; fields one version did not have yet are skipped) that differ."""
    return sorted(k for k in set(a) & set(b) if k not in RUNTIME_FIELDS + LENGTH_FIELDS and a[k] != b[k])


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise VitlabError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise VitlabError(f"{self.path.parent}: the run is in use by {holder}; wait for it to end or stop it "
                              "(nothing was written)") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        text = f"vitlab pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


# ----- automatic resume (``--resume auto``, torchrun's elastic restarts, a requeued scheduler job)
LAUNCH_NAME = "launch.json"


def launch_ids() -> dict:
    """What identifies this launch across restarts: torchrun's rendezvous id (the same for every restart of one
    ``torchrun``; ``none`` when it was not given) and the scheduler's job id (the same when SLURM requeues a job)."""
    ids = {"torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    return {k: v for k, v in ids.items() if v and v != "none"}


def _stored_config(run_dir: Path) -> dict | None:
    try:
        stored = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return stored if isinstance(stored, dict) and "model" in stored and "data" in stored else None


def auto_run_dir(out_dir: str | Path, run_name: str | None, train_config: dict) -> Path | None:
    """The run folder an automatic resume continues or starts in: ``out_dir/run_name`` for a fixed name; without
    one, the folder under ``out_dir`` made by this launch (same torchrun rendezvous id or SLURM job id, see
    :func:`launch_ids`) for the same config; None when there is none (a fresh run with a new folder). A named folder
    that holds something other than this run is refused in one line (nothing is written)."""
    out = Path(out_dir)
    if run_name:
        run_dir = out / run_name
        if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
            return run_dir
        stored = _stored_config(run_dir) if run_dir.is_dir() else None
        if stored is None:
            raise VitlabError(f"resume=auto: {run_dir} exists and is not a vitlab run folder; give another "
                              "run_name (nothing was written)", options=("resume", "run_name"))
        if changed := _differences(stored, train_config):
            raise VitlabError(f"resume=auto: {run_dir} holds another run (it differs in {', '.join(changed[:4])}); "
                              "give the same settings to continue it, or another run_name (nothing was written)",
                              options=("resume", "run_name"))
        return run_dir
    ids = launch_ids()
    if not ids or not out.is_dir():
        return None
    for run_dir in sorted(out.iterdir()):
        try:
            recorded = json.loads((run_dir / LAUNCH_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        same_launch = isinstance(recorded, dict) and any(recorded.get(k) == v for k, v in ids.items())
        stored = _stored_config(run_dir) if same_launch else None
        if stored is not None and not _differences(stored, train_config):
            return run_dir
    return None
