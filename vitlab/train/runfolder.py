"""The run folder: the names of what a run writes into it, and the rules for writing into it again (``--resume``).

    runs/<name>/
      config.json          the resolved TrainConfig (what `--resume` and `vitlab train --config` read back)
      log.txt              the text log (also on stderr), including every skipped image file
      metrics.jsonl        one JSON object per logged step ("kind": "step") and per evaluation ("kind": "eval")
      metrics.csv          the evaluations as a table (epoch, step, loss, top1, top5, ...)
      checkpoints/         last.pt and best.pt (training state, torch.load(weights_only=True))
      model.safetensors    the final model with its preprocessing and class names (vitlab.save)
      adapter.safetensors  a LoRA / DoRA run's adapters (vitlab.train.lora)
      result.json          final metrics, timings and compute
      tensorboard/         event files, when the tensorboard tracker is on (vitlab.train.trackers)
      wandb/, mlruns/      the W&B offline run and the MLflow file store, when those trackers are chosen
      trackers.json        the W&B / MLflow run ids, so that a resumed run continues them
      run.lock             held by the process training the run
      launch.json          torchrun rendezvous id / SLURM job id, for --resume auto after a restart or requeue
      .shared-check        for a moment at the start of a multi-process run: the token every process reads back

:class:`RunFolder` names these files (every other module asks it) and owns the resume rules. A run folder is
identified by what vitlab writes when it creates one: ``config.json`` (the resolved config, written right after the
folder is made) next to ``checkpoints/``. ``--resume`` writes into a folder only when the checkpoint is
``RUN/checkpoints/<file>.pt`` and ``RUN/config.json`` is a training config describing the same run as the
checkpoint (every field but the runtime ones and the length). Folders written by earlier versions have the same two
things and are accepted as they are; anything else (a checkpoint copied into a backup folder, a folder of other
files) is refused before anything is written.

While a run trains, its main process holds an exclusive ``flock`` on ``RUN/run.lock``, which names the holder (pid,
host, start time); a second process that wants to write the same run refuses in one line naming it. The lock goes
with the process (also when it is killed), so a stale lock file never blocks a resume.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import VitlabError


class RunFinished(VitlabError):
    """``--resume`` of a run that has finished and is not asked to go on: nothing was written."""


def total_steps_for(steps: int | None, epochs: float | None, steps_per_epoch: int) -> int:
    """A run's length in optimiser steps: ``steps`` when set, else ``epochs`` (one when unset) of
    ``steps_per_epoch``, rounded up. The one place this rule is written (the run, a resumed run's new length)."""
    return int(steps) if steps else int(math.ceil((epochs or 1) * steps_per_epoch))


def eval_interval_for(eval_every_epochs: float | None, steps_per_epoch: int, total_steps: int) -> int:
    """Steps between a run's evaluations: ``eval_every_epochs`` of ``steps_per_epoch`` (at least one step), or the
    whole run when it is 0 (evaluated only at the end)."""
    if not eval_every_epochs or eval_every_epochs <= 0:
        return total_steps
    return max(1, int(round(eval_every_epochs * steps_per_epoch)))


def early_stop_due(config, eval_interval: int, step: int, best: dict | None) -> bool:
    """Whether ``early_stop`` ends a run evaluated at ``step``: ``config.early_stop`` evaluations (one every
    ``eval_interval`` steps) have come since the best one (``best['step']``) without beating it."""
    if not config.early_stop or not best:
        return False
    return (step - int(best["step"])) // eval_interval >= config.early_stop


class RunFolder:
    """One run folder: the paths of its files (``folder.config``, ``folder.last``, ``folder.model``, ...) and what
    may be done with it on a resume (:meth:`of_checkpoint`, :meth:`auto`, :meth:`resumed_config`)."""

    CONFIG = "config.json"
    LOG = "log.txt"
    METRICS = "metrics.jsonl"
    METRICS_CSV = "metrics.csv"
    CHECKPOINTS = "checkpoints"
    LAST = "last.pt"
    BEST = "best.pt"
    MODEL = "model.safetensors"
    ADAPTER = "adapter.safetensors"
    RESULT = "result.json"
    TENSORBOARD = "tensorboard"
    MLFLOW = "mlruns"
    TRACKER_IDS = "trackers.json"
    LOCK = "run.lock"
    LAUNCH = "launch.json"
    SHARED_CHECK = ".shared-check"  # a token rank 0 writes and every process reads back (then removed)
    # the settings a resumed run takes from the command line (the rest comes from the checkpoint), and its length
    # (which a resume may make longer)
    RUNTIME_FIELDS = ("device", "threads", "progress", "num_workers", "trackers")
    LENGTH_FIELDS = ("epochs", "steps")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The file ``name`` in the folder (one of the names above)."""
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>`` (``last.pt``, ``best.pt``)."""
        return self.checkpoints / name

    @property
    def last(self) -> Path:
        return self.checkpoint(self.LAST)

    @property
    def best(self) -> Path:
        return self.checkpoint(self.BEST)

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def result(self) -> Path:
        return self.path / self.RESULT

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def launch(self) -> Path:
        return self.path / self.LAUNCH

    def stored_config(self) -> dict | None:
        """``config.json`` when it is a training config, else None."""
        try:
            stored = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return stored if isinstance(stored, dict) and "model" in stored and "data" in stored else None

    # ----- every process sees this folder (a multi-node run writes through rank 0 into one shared folder)
    def write_token(self) -> str:
        """Write a fresh random token into the folder (rank 0) and return it."""
        token = secrets.token_hex(16)
        write_text_atomic(self.file(self.SHARED_CHECK), token)
        return token

    def sees_token(self, token: str, wait: float) -> bool:
        """Whether this process reads ``token`` back from the folder, looking for up to ``wait`` seconds (a shared
        filesystem may show another machine's new file a little late)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.file(self.SHARED_CHECK).read_text(encoding="utf-8") == token:
                    return True
            except (OSError, UnicodeDecodeError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def remove_token(self) -> None:
        self.file(self.SHARED_CHECK).unlink(missing_ok=True)

    # ----- the resume rules
    @staticmethod
    def differences(a: dict, b: dict) -> list[str]:
        """The fields of two configs (as dicts) that differ, other than the runtime and length fields (fields one
        version did not have yet are skipped)."""
        ignored = RunFolder.RUNTIME_FIELDS + RunFolder.LENGTH_FIELDS
        return sorted(k for k in set(a) & set(b) if k not in ignored and a[k] != b[k])

    @classmethod
    def resume_checkpoint(cls, resume: str | os.PathLike) -> Path:
        """``--resume`` takes a run folder (its ``checkpoints/last.pt``) or a checkpoint file."""
        path = Path(resume)
        if path.is_dir():
            path = cls(path).last
        if not path.is_file():
            raise VitlabError(f"{resume}: no checkpoint to resume from (expected a run folder with "
                              f"{cls.CHECKPOINTS}/{cls.LAST} or a .pt file)")
        return path

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike, train_config: dict | None = None) -> RunFolder:
        """The run folder holding ``checkpoint``; refuses (one line, nothing written) a checkpoint that is not in a
        vitlab run folder, or one whose ``config.json`` describes another run than ``train_config`` (the
        checkpoint's)."""
        checkpoint = Path(checkpoint)
        where = checkpoint.resolve().parent
        folder = cls(where.parent)
        why = None
        if where.name != cls.CHECKPOINTS:
            why = f"it is not in a run folder's {cls.CHECKPOINTS}/ folder ({where} is not)"
        elif not folder.config.is_file():
            why = f"{folder.config} is missing (vitlab writes it when it creates a run folder)"
        elif (stored := folder.stored_config()) is None:
            why = f"{folder.config} is not a vitlab training config"
        elif train_config is not None and (changed := cls.differences(stored, train_config)):
            why = (f"{folder.config} describes another run than the checkpoint (they differ in "
                   f"{', '.join(changed[:4])})")
        if why:
            raise VitlabError(f"{checkpoint}: resume writes only into a vitlab run folder, and {why}; nothing was "
                              "written (copy the whole run folder to resume a copy)")
        return folder

    @classmethod
    def resumed_config(cls, stored, given):
        """The config a resumed run trains with: the checkpoint's (``stored``), with the runtime-only settings of
        this call (``given``; trackers not chosen again, None, stay the run's own); everything that shapes the result
        comes from the checkpoint."""
        return stored.replace(**{k: getattr(given, k) for k in cls.RUNTIME_FIELDS
                                 if k != "trackers" or given.trackers is not None})

    def resume_length(self, config, state: dict, epochs: float | None = None, steps: int | None = None):
        """(the resumed run's config with its new length, whether the length changed): ``epochs`` or ``steps``, when
        given, replace the stored length. Refuses a length shorter than what is done, and raises
        :class:`RunFinished` for a finished run that is not made longer."""
        done = int(state["step"])
        spe = state.get("steps_per_epoch")
        if not spe and state.get("epoch"):  # a checkpoint of an earlier version
            spe = max(1, round(done / state["epoch"]))
        changed = False
        if steps is not None or epochs is not None:
            new = config.replace(steps=steps, epochs=None) if steps is not None else config.replace(epochs=epochs,
                                                                                                     steps=None)
            changed = (new.steps, new.epochs) != (config.steps, config.epochs)
            config = new
        total = total_steps_for(config.steps, config.epochs, spe) if spe else config.steps
        given = f"steps={steps}" if steps is not None else f"epochs={epochs:g}" if epochs is not None else None
        if total is not None and total < done:
            raise VitlabError(f"{given or self.path}: the run is already at step {done} (epoch "
                              f"{state['epoch']:.2f}); give a longer run to continue it", options=("steps", "epochs"))
        if self.result.is_file() and spe and early_stop_due(
                config, eval_interval_for(config.eval_every_epochs, spe, total), done, state.get("best")):
            raise RunFinished(f"{self.path}: the run stopped early at step {done} (epoch {state['epoch']:.2f}; "
                              f"early_stop={config.early_stop}); its best model is in checkpoints/best.pt: start a "
                              "new run from it (init_from) to train on", options=("early_stop",))
        if self.result.is_file() and total is not None and done >= total:
            raise RunFinished(f"{self.path}: the run has finished at step {done} (epoch {state['epoch']:.2f}); "
                              "nothing changed (give epochs or steps beyond that to train on)",
                              options=("epochs", "steps"))
        return config, changed

    @classmethod
    def auto(cls, out_dir: str | os.PathLike, run_name: str | None, train_config: dict) -> RunFolder | None:
        """The run folder an automatic resume continues or starts in: ``out_dir/run_name`` for a fixed name; without
        one, the folder under ``out_dir`` made by this launch (same torchrun rendezvous id or SLURM job id, see
        :func:`launch_ids`) for the same config; None when there is none (a fresh run with a new folder). A named
        folder that holds something other than this run is refused in one line (nothing is written)."""
        out = Path(out_dir)
        if run_name:
            folder = cls(out / run_name)
            if not folder.path.exists() or (folder.path.is_dir() and not any(folder.path.iterdir())):
                return folder
            stored = folder.stored_config() if folder.path.is_dir() else None
            if stored is None:
                raise VitlabError(f"resume=auto: {folder.path} exists and is not a vitlab run folder; give another "
                                  "run_name (nothing was written)", options=("resume", "run_name"))
            if changed := cls.differences(stored, train_config):
                raise VitlabError(f"resume=auto: {folder.path} holds another run (it differs in "
                                  f"{', '.join(changed[:4])}); give the same settings to continue it, or another "
                                  "run_name (nothing was written)", options=("resume", "run_name"))
            return folder
        ids = launch_ids()
        if not ids or not out.is_dir():
            return None
        for path in sorted(out.iterdir()):
            folder = cls(path)
            try:
                recorded = json.loads(folder.launch.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            same_launch = isinstance(recorded, dict) and any(recorded.get(k) == v for k, v in ids.items())
            stored = folder.stored_config() if same_launch else None
            if stored is not None and not cls.differences(stored, train_config):
                return folder
        return None


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release` (or the process's end)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = RunFolder(run_dir).lock
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
def launch_ids() -> dict:
    """What identifies this launch across restarts: torchrun's rendezvous id (the same for every restart of one
    ``torchrun``; ``none`` when it was not given) and the scheduler's job id (the same when SLURM requeues a job)."""
    ids = {"torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    return {k: v for k, v in ids.items() if v and v != "none"}


# ----- what the processes of a multi-node run see (docs/training.md, clusters)
SHARED_WAIT_ENV = "VITLAB_SHARED_WAIT"
SHARED_HINT = ("every node needs the run folder on one shared filesystem (the same out_dir path on every node, "
               "e.g. an NFS or Lustre mount)")


def shared_wait() -> float:
    """How long a process looks for the token rank 0 wrote before it reports the run folder unseen, in seconds:
    ``$VITLAB_SHARED_WAIT``, 10 by default."""
    text = os.environ.get(SHARED_WAIT_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else 10.0
    except ValueError:
        raise VitlabError(f"{SHARED_WAIT_ENV}={text}: takes a number of seconds") from None


def _by_node(ranks: list[tuple[int, str]]) -> str:
    """``node 1 (host-b) ranks 2, 3`` for (rank, node name) pairs, one group per node."""
    nodes: dict[str, list[int]] = {}
    for rank, node in ranks:
        nodes.setdefault(node, []).append(rank)
    return "; ".join(f"{node} rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for node, r in nodes.items())


def unseen_folder(path: str | os.PathLike, views: list[tuple[bool, str]]) -> str | None:
    """The one-line error when some process does not see the run folder rank 0 made (``views``: per rank, whether it
    read the token back and its node's name); None when every process sees it."""
    missing = [(rank, node) for rank, (seen, node) in enumerate(views) if not seen]
    if not missing:
        return None
    return (f"{path}: the run folder that rank 0 made on {views[0][1]} is not visible on {_by_node(missing)}; "
            f"{SHARED_HINT}; nothing was trained")


def disagreement(views: list[tuple[str, str]]) -> str | None:
    """The one-line error when the processes found different things at the start (``views``: per rank, what it
    found, e.g. ``resumes runs/a/checkpoints/last.pt at step 20``, and its node's name); None when all agree."""
    first = views[0][0]
    others: dict[str, list[tuple[int, str]]] = {}
    for rank, (found, node) in enumerate(views):
        if found != first:
            others.setdefault(found, []).append((rank, node))
    if not others:
        return None
    told = "; while ".join(f"{_by_node(ranks)} {found}" for found, ranks in others.items())
    return (f"the processes do not see the same run: rank 0 on {views[0][1]} {first}, while {told}; {SHARED_HINT}; "
            "nothing was written")
