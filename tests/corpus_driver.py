"""Run ``vitlab`` commands on many checkpoint files in one interpreter, measuring each run's peak memory.

``python -m tests.corpus_driver SPEC.json OUT.json``: SPEC holds ``{"warmup": [argv, ...], "cases": {name: argv}}``.
Each case runs :func:`vitlab.cli.main` with stdout and stderr captured; before it the kernel's peak-RSS mark of
this process is reset (``/proc/self/clear_refs``), so ``VmHWM - VmRSS`` afterwards is what that one run added on top
of the warmed-up interpreter. OUT gets ``{name: {"rc", "stderr", "peak_kb"}}``; an exception that escapes ``main``
is recorded as ``rc: "exception"`` with its traceback as stderr. The interpreter's address space is capped
(``ADDRESS_SPACE_LIMIT``), so that a regression that does allocate gigabytes fails with a MemoryError here instead
of drawing on the machine's memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import traceback

ADDRESS_SPACE_LIMIT = 6 * 2**30  # bytes; torch with its libraries maps about 2 GiB of it


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
M_MMAP_THRESHOLD = -3


def run_case(argv: list[str]) -> dict:
    from vitlab.cli import main

    if LIBC is not None:
        LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException:  # noqa: BLE001  (what escapes main is the finding)
            traceback.print_exc(file=err)
            rc = "exception"
    return {"rc": rc, "stderr": err.getvalue(), "peak_kb": _status_kb("VmHWM") - before}


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    for argv in spec.get("warmup", []):
        run_case(argv)
    results = {name: run_case(argv) for name, argv in spec["cases"].items()}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
