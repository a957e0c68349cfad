"""The run folder: resolved config, metrics, log and checkpoints, written by the main process only.

    runs/<name>/
      config.json          the resolved TrainConfig (what `--resume` and `vitlab train --config` read back)
      log.txt              the text log (also on stderr), including every skipped image file
      metrics.jsonl        one JSON object per logged step ("kind": "step") and per evaluation ("kind": "eval")
      metrics.csv          the evaluations as a table (epoch, step, loss, top1, top5, ...)
      checkpoints/         last.pt and best.pt (training state, torch.load(weights_only=True))
      model.safetensors    the final model with its preprocessing and class names (vitlab.save)
      result.json          final metrics, timings and compute
      tensorboard/         event files, when the tensorboard package is installed
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path

from ..atomic import write_text_atomic

LOGGER_NAME = "vitlab.train"


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A fresh folder ``out_dir/name`` (``-2``, ``-3``, ... appended when the name is taken)."""
    base = Path(out_dir) / name
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def default_run_name(data: str, model: str) -> str:
    stem = Path(str(data).rstrip("/")).name or "data"
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-") or "data"
    return f"{stem}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class RunLog:
    """Writes the run folder's log and metrics (a no-op object on ranks other than 0: pass ``enabled=False``)."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, console: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.logger = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: list[logging.Handler] = []
        self._tb = None
        if not enabled:
            return
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        if console:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            self._handlers.append(h)
        if self.enabled:
            fh = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
            fh.setFormatter(fmt)
            self._handlers.append(fh)
        for h in self._handlers:
            self.logger.addHandler(h)

    def info(self, message: str) -> None:
        if self._handlers:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        if self._handlers:
            self.logger.warning(f"warning: {message}")

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            write_text_atomic(self.run_dir / name, json.dumps(data, indent=2, default=_clean) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step`` (left by a run killed after its last checkpoint) before resuming."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= after_step]
            write_text_atomic(path, "".join(line + "\n" for line in keep))
            self._rewrite_csv()

    def metric(self, row: dict) -> None:
        """Append one metrics row (JSONL; evaluations also to the CSV table and TensorBoard)."""
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("kind") == "eval":
            self._rewrite_csv()
        self._tensorboard(row)

    def _rewrite_csv(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        evals = [r for r in rows if r.get("kind") == "eval"]
        if not evals:
            return
        columns = list(dict.fromkeys(k for r in evals for k in r if k != "kind"))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in evals)
        write_text_atomic(self.run_dir / "metrics.csv", buf.getvalue())

    def _tensorboard(self, row: dict) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self._tb is False:
            return
        prefix = "train" if row.get("kind") == "step" else row.get("kind", "eval")
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                self._tb.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))

    def close(self) -> None:
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers = []
        if self._tb:
            self._tb.close()

