"""The run folder's log and metrics (``log.txt``, ``metrics.jsonl``, ``metrics.csv``, TensorBoard) and its JSON
files, written by the main process only. What each file holds: :mod:`vitlab.train.runfolder`.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path

from ..atomic import WriteError, write_text_atomic
from ..errors import VitlabError
from .runfolder import RunFolder
from .trackers import Trackers, chosen_trackers, system_info

LOGGER_NAME = "vitlab.train"
_RUN_NUMBERS = itertools.count(1)  # names each RunLog's logger uniquely within the process


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A fresh folder ``out_dir/name`` (``-2``, ``-3``, ... appended when the name is taken). An ``out_dir`` that is
    a file, or one that cannot be written, is refused naming ``out_dir``."""
    out = Path(out_dir)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise VitlabError(f"out_dir={out_dir}: {parent} is a file, not a folder", options=("out_dir",))
            break
    base = out / name
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise VitlabError(f"out_dir={out_dir}: cannot create the run folder {path} "
                              f"({exc.strerror or exc})", options=("out_dir",)) from None


def default_run_name(data: str, model: str) -> str:
    stem = Path(str(data).rstrip("/")).name or "data"
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-") or "data"
    return f"{stem}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def printable(text: str) -> str:
    """``text`` with what cannot be written as UTF-8 shown as escapes: a file name that is not valid UTF-8 arrives
    as lone surrogates (Python's ``surrogateescape``), which a UTF-8 log would refuse; its bytes are shown as
    ``\\xNN`` so the name is still recognisable."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the file name's original bytes
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` (one or more complete lines) to ``path`` whole or not at all: a short or failed write (a full
    disk) is cut back to where the file ended, so no reader ever sees half a line. Raises the OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                n = os.write(fd, data[written:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def read_metrics(path: str | Path, *, repair: bool = False) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A torn last line (no newline at the end, or not JSON: what a kill or a full
    disk during the append leaves) is dropped, and with ``repair`` cut from the file; a broken line anywhere else
    is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: b"" for a file that ends whole
    rows, good_end, offset = [], 0, 0
    for number, line in enumerate(lines, start=1):
        offset += len(line) + 1
        if not line.strip():
            good_end = offset
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) and not tail:
                break  # the last line is torn (e.g. written up to a full disk, newline included)
            raise VitlabError(f"{path}: line {number} is not JSON; the file is damaged (remove the line to go on)"
                              ) from None
        if not isinstance(row, dict):
            raise VitlabError(f"{path}: line {number} is not a JSON object; the file is damaged")
        rows.append(row)
        good_end = offset
    if repair and good_end < len(data):
        with open(path, "rb+") as f:
            f.truncate(good_end)
    return rows


class _WholeLineHandler(logging.Handler):
    """Writes each formatted record to ``log.txt`` as one whole line (:func:`append_whole`); what cannot be encoded
    is escaped (:func:`printable`). A failed write raises (a full disk ends the run with one line), where
    ``logging.FileHandler`` would print "--- Logging error ---" and drop the line."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        line = printable(self.format(record)).replace("\n", " ") + "\n"
        try:
            append_whole(self.path, line.encode("utf-8"))
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from None


class _ConsoleHandler(logging.StreamHandler):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class RunLog:
    """Writes the run folder's log and metrics (a no-op object on ranks other than 0: pass ``enabled=False``).

    Each RunLog owns its logger and handlers: the logger is its own object, not registered in ``logging``'s global
    table (where a name made from ``id(self)`` would hand a later run, given the same id, an earlier run's handlers
    writing to the earlier folder's ``log.txt``). :meth:`close` (or leaving a ``with RunLog(...)`` block, also on an
    exception) detaches and closes them.

    ``config`` (a TrainConfig) opens the trackers it chooses (``config.trackers``, :mod:`vitlab.train.trackers`) on
    the main process; every process checks the choice, so a missing package is refused alike on all of them.
    ``info`` (the run's DistInfo) gives the device and the number of processes for the system info."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, console: bool = True, *, config=None,
                 info=None):
        names = chosen_trackers(config.trackers) if config is not None else []
        self.run_dir = run_dir
        self.enabled = enabled and run_dir is not None
        self.logger = logging.Logger(f"{LOGGER_NAME}.run{next(_RUN_NUMBERS)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: list[logging.Handler] = []
        self._trackers: Trackers | None = None
        if not enabled:
            return
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        if console:
            h = _ConsoleHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            self._handlers.append(h)
        if self.enabled:
            fh = _WholeLineHandler(RunFolder(run_dir).log)
            fh.setFormatter(fmt)
            self._handlers.append(fh)
        for h in self._handlers:
            self.logger.addHandler(h)
        if self.enabled and names:
            system = system_info(info.device if info else "cpu", info.world_size if info else 1)
            try:
                self._trackers = Trackers(run_dir, names, config.to_dict(), system, warn=self.warning)
            except BaseException:
                self.close()
                raise

    def info(self, message: str) -> None:
        if self._handlers:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        if self._handlers:
            self.logger.warning(f"warning: {message}")

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            write_text_atomic(self.run_dir / name, json.dumps(data, indent=2, default=_clean) + "\n")

    def result(self, data: dict) -> None:
        """Write ``result.json`` and hand the result (with the model's and the last checkpoint's paths) to the
        trackers."""
        self.write_json(RunFolder.RESULT, data)
        if self._trackers is not None:
            self._trackers.finish(data)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step`` (left by a run killed after its last checkpoint) before resuming."""
        if not self.enabled:
            return
        path = RunFolder(self.run_dir).metrics
        if path.is_file():
            keep = [row for row in read_metrics(path) if row.get("step", 0) <= after_step]
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))
            self._rewrite_csv()

    def metric(self, row: dict) -> None:
        """Append one metrics row (JSONL; evaluations also to the CSV table; every row to the trackers)."""
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        path = RunFolder(self.run_dir).metrics
        try:
            append_whole(path, (json.dumps(row) + "\n").encode("utf-8"))
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        if row.get("kind") == "eval":
            self._rewrite_csv()
        if self._trackers is not None:
            self._trackers.log(row)

    def _rewrite_csv(self) -> None:
        rows = read_metrics(RunFolder(self.run_dir).metrics)
        evals = [r for r in rows if r.get("kind") == "eval"]
        if not evals:
            return
        columns = list(dict.fromkeys(k for r in evals for k in r if k != "kind"))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in evals)
        write_text_atomic(RunFolder(self.run_dir).file(RunFolder.METRICS_CSV), buf.getvalue())

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Detach and close the handlers and the trackers; further log calls do nothing."""
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers = []
        trackers, self._trackers = self._trackers, None
        if trackers is not None:
            trackers.close()

