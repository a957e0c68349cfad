"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, fed by the run log (:class:`~.runlog.RunLog`).

What each tracker receives: the run's config (as it is in ``config.json``), the system it runs on
(:func:`system_info`), every metrics row (the ``kind: step`` rows as ``train/<name>``, evaluations as
``eval/<name>``, at the row's step) and, at the end, the result (final metrics, the model and the last checkpoint's
paths). Only the main process (rank 0) logs.

Choosing: ``TrainConfig.trackers`` (``--tracker``) names them; ``None`` (the default) means TensorBoard when the
``tensorboard`` package is installed and nothing else, ``[]`` ("none") means none. A chosen tracker whose package is
missing is refused in one line naming the extra that installs it.

Offline use is each library's own: W&B reads ``WANDB_MODE`` (``offline`` writes ``<run>/wandb/offline-run-*``, for
``wandb sync`` later), ``WANDB_PROJECT`` / ``WANDB_ENTITY``; MLflow logs to ``MLFLOW_TRACKING_URI`` when set (a
server, a database or a ``file:`` store) and otherwise to a file store in the run folder (``<run>/mlruns``),
with ``MLFLOW_EXPERIMENT_NAME`` (default ``vitlab``). A resumed run continues the same W&B and MLflow runs: their ids
are kept in ``<run>/trackers.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..errors import VitlabError
from .config import TRACKER_NAMES
from .runfolder import RunFolder

# tracker -> (the module it needs, the vitlab extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
PROJECT = "vitlab"  # the W&B project and MLflow experiment when the environment names none


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def chosen_trackers(names: list[str] | None) -> list[str]:
    """The trackers to open: ``names`` (each one checked to be installed; a missing package is a
    :class:`~vitlab.errors.VitlabError` naming the extra), or for ``None`` TensorBoard when it is installed."""
    if names is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    out = []
    for name in names:
        if name not in PACKAGES:
            raise VitlabError(f"trackers={name}: unknown tracker (takes {', '.join(TRACKER_NAMES)} or none)",
                              options=("trackers",))
        module, extra = PACKAGES[name]
        if not _installed(module):
            raise VitlabError(f"trackers={name}: the {module} package is not installed; install vitlab's '{extra}' "
                              f"extra (pip install 'vitlab[{extra}]')", options=("trackers",))
        if name not in out:
            out.append(name)
    return out


def system_info(device: torch.device | str, world_size: int) -> dict:
    """What the run ran on: CPU model, cores, torch / Python version, device (and GPU name), processes."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next((line.partition(":")[2].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    device = torch.device(device)
    info = {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "nproc": world_size, "threads": torch.get_num_threads()}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def scalars(row: dict) -> tuple[int, dict]:
    """A metrics row's step and its numbers, named ``train/<key>`` (step rows) or ``<kind>/<key>``; strings,
    booleans, nulls (a NaN) and the step / epoch counters themselves are left out."""
    prefix = "train" if row.get("kind") == "step" else str(row.get("kind", "eval"))
    values = {f"{prefix}/{key}": float(value) for key, value in row.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch")}
    return int(row.get("step", 0)), values


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, system: dict, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunFolder(run_dir).file(RunFolder.TENSORBOARD)))
        # text panels: markdown code blocks keep the JSON's layout
        self.writer.add_text("config", _code(config))
        self.writer.add_text("system", _code(system))

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, result: dict) -> None:
        self.writer.add_text("result", _code(result))

    def close(self, ok: bool) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, system: dict, ids: dict):
        import wandb

        self.wandb = wandb
        known = ids.get("wandb") or {}
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_dir.name, dir=str(run_dir),
                id=known.get("id"), resume="allow" if known.get("id") else None,
                config={**config, "system": system})
        except Exception as exc:  # wandb raises its own errors (no API key, no connection): one line, the way out
            raise VitlabError(f"trackers=wandb: cannot start the W&B run ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); log in with "
                              "`wandb login`, or set WANDB_MODE=offline to write the run locally",
                              options=("trackers",)) from exc
        ids["wandb"] = {"id": self.run.id}

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, result: dict) -> None:
        for key, value in result.items():
            self.run.summary[key] = value

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, system: dict, ids: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # offline by default: a file store in the run folder (MLflow >= 3.7 asks to allow it)
            uri = RunFolder(run_dir).file(RunFolder.MLFLOW).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._start(MlflowClient(tracking_uri=uri), uri, run_dir, config, system, ids)
        except Exception as exc:  # MLflow's own errors (a refused store, a missing driver): one line, the way out
            text = str(exc).strip()
            raise VitlabError(f"trackers=mlflow: cannot start the MLflow run at {uri} ({type(exc).__name__}: "
                              f"{text.splitlines()[0] if text else exc!r}); check MLFLOW_TRACKING_URI, or unset it "
                              "to log to the run folder's file store", options=("trackers",)) from exc

    def _start(self, client, uri: str, run_dir: Path, config: dict, system: dict, ids: dict) -> None:
        from mlflow.entities import Param, RunTag

        self.client = client
        known = ids.get("mlflow") or {}
        self.run_id = None
        if known.get("run_id") and known.get("tracking_uri") == uri:
            try:
                self.run_id = client.get_run(known["run_id"]).info.run_id
                client.update_run(self.run_id, status="RUNNING")
            except Exception:  # gone from the store (deleted, another server): start a new MLflow run
                self.run_id = None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            self.run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            # parameters are written once (MLflow refuses to change one; a resumed run's device may differ)
            params = [Param(key, _param(value)) for key, value in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        client.log_batch(self.run_id, tags=[RunTag(f"system.{k}", str(v)) for k, v in system.items()]
                         + [RunTag("run_dir", str(run_dir))])
        ids["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, result: dict) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in result.items() if isinstance(v, (str, int, float)) and v is not None]
        self.client.log_batch(self.run_id, tags=tags)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


_KINDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The chosen trackers of one run (open them on the main process only): :meth:`log` each metrics row,
    :meth:`finish` with the result, :meth:`close` at the end (a run closed without a result, stopped or failed, is
    marked so in W&B and MLflow).

    A tracker that cannot start raises (:class:`~vitlab.errors.VitlabError`, before the run's first step); one that
    fails later (a tracking server gone) is reported once through ``warn`` and dropped, and the run goes on: its
    metrics are in ``metrics.jsonl`` either way."""

    def __init__(self, run_dir: Path, names: list[str], config: dict, system: dict, warn=None):
        self.run_dir = Path(run_dir)
        self._open: list = []
        self._done = False
        self._warn = warn or (lambda message: None)
        ids_path = RunFolder(self.run_dir).file(RunFolder.TRACKER_IDS)
        try:
            ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ids = {}  # unreadable: the trackers start new runs rather than stop this one
        ids = ids if isinstance(ids, dict) else {}
        try:
            for name in names:
                self._open.append((name, _KINDS[name](self.run_dir, config, system, ids)))
        except BaseException:
            self.close()
            raise
        if set(names) & {"wandb", "mlflow"}:
            write_text_atomic(ids_path, json.dumps(ids, indent=2) + "\n")

    def log(self, row: dict) -> None:
        step, values = scalars(row)
        if values:
            self._each("log", step, values)

    def finish(self, result: dict) -> None:
        """The end of the run: ``result`` (final metrics, paths) plus the last checkpoint's path."""
        last = RunFolder(self.run_dir).last
        summary = dict(_flat({"final": result.get("metrics") or {}}))
        summary.update({k: v for k, v in result.items() if k not in ("metrics", "best") and v is not None})
        if last.is_file():
            summary["checkpoint"] = str(last)
        self._each("finish", summary)
        self._done = True

    def close(self) -> None:
        self._each("close", self._done)
        self._open = []

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self._open):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # the training goes on without this tracker
                self._open.remove((name, tracker))
                self._warn(f"tracker {name} failed ({type(exc).__name__}: {exc}); it logs nothing more in this run "
                           "(metrics.jsonl has every row)")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]  # MLflow's limit on a parameter value


def _code(data: dict) -> str:
    return "```\n" + json.dumps(data, indent=2, default=str) + "\n```"
