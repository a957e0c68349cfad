"""Downloading a checkpoint from a URL into the cache: resumable, checked, atomic, safe under concurrency.

:func:`fetch` returns the cached file when it is there (no network at all); otherwise it downloads to
``<name>.part`` next to the final file, resuming a partial download with an HTTP ``Range`` request (also after the
connection drops mid-way), checks the result (size and sha256 when known, and that it is a checkpoint rather than an
HTML page), and only then renames it onto the final name. A lock file makes a second process that wants the same file
wait for the first and then use its result. A failed check deletes the partial file; a good cached file is never
touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import VitlabError
from .cache import cache_path, http_url, offline_mode

CHUNK = 1 << 20
RETRIES = 5
TIMEOUT = 60.0
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


def placement_hint(url: str, dest: Path) -> str:
    """How to put the file in place by hand (the last part of the offline / no-network messages): a command that
    works on a fresh machine (it creates the cache folders and saves no error page)."""
    return (f"download {http_url(url)} and save it as {dest} "
            f"(e.g. `curl -L --fail --create-dirs -o '{dest}' '{http_url(url)}'`)")


def fetch(url: str, *, size: int | None = None, sha256: str | None = None, progress: bool | None = None,
          offline: bool | None = None) -> Path:
    """The local copy of ``url`` (``gs://``, ``https://`` or ``http://``), downloaded into the cache if needed.

    ``size`` (bytes) and ``sha256`` are checked when given. ``progress``: a tqdm bar on stderr (default: when stderr
    is a terminal). ``offline`` (default: :func:`~vitlab.hub.cache.offline_mode`) refuses any download. Raises
    :class:`VitlabError` with one line naming the URL, the cache path and how to place the file by hand."""
    dest = cache_path(url)
    if dest.is_file():
        return _check_cached(dest, size, url)
    if offline_mode() if offline is None else offline:
        raise VitlabError(f"{url}: not in the cache and network use is off (VITLAB_OFFLINE / HF_HUB_OFFLINE / "
                          f"--offline); {placement_hint(url, dest)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if dest.is_file():  # another process finished it while this one waited for the lock
            return _check_cached(dest, size, url)
        part = dest.with_name(dest.name + ".part")
        # an interrupted download keeps ``part`` so that the next call resumes it; a failed check deletes it
        _download(url, part, size, sys.stderr.isatty() if progress is None else progress)
        _verify(part, url, size, sha256)
        _publish(part, dest)
    return dest


def _check_cached(dest: Path, size: int | None, url: str) -> Path:
    if size is not None and dest.stat().st_size != size:
        raise VitlabError(f"{dest}: cached copy of {url} has {dest.stat().st_size} bytes, the catalog says {size}; "
                          "delete it to download the file again")
    return dest


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block; other processes block until it is released."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock (documented)
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _download(url: str, part: Path, size: int | None, progress: bool) -> None:
    """Fill ``part`` with the whole file, resuming from what it already holds; retries a dropped connection."""
    from tqdm import tqdm

    address = http_url(url)
    bars: list = []

    def make_bar(total: int | None, start: int) -> None:
        if progress and not bars:
            bars.append(tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=Path(part.name[: -len(".part")]).name[:40], file=sys.stderr, leave=False))

    def advance(n: int) -> None:
        if bars:
            bars[0].update(n)

    failures = 0
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            try:
                total = _transfer(address, url, part, have, size, advance, make_bar)
                got = part.stat().st_size
                if total is not None and got < total:
                    raise http.client.IncompleteRead(b"", total - got)
                return
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                failures += 1
                if failures > RETRIES:
                    kept = part.stat().st_size if part.exists() else 0
                    raise VitlabError(f"{address}: the download kept breaking off ({type(exc).__name__}); {kept} "
                                      f"bytes kept in {part}, run again to resume") from None
                time.sleep(min(0.2 * failures, 2.0))
    finally:
        for bar in bars:
            bar.close()


def _transfer(address: str, url: str, part: Path, have: int, size: int | None, advance, make_bar) -> int | None:
    """One HTTP request: append the rest of the file to ``part`` (from byte ``have``); returns the full size."""
    request = urllib.request.Request(address, headers={"User-Agent": "vitlab", "Accept-Encoding": "identity",
                                                       **({"Range": f"bytes={have}-"} if have else {})})
    dest = part.with_name(part.name[: -len(".part")])
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch, or a stale partial file: start again
            part.unlink()
            raise ConnectionError("range not satisfiable") from None
        raise VitlabError(f"{address}: the server answered {exc.code} {exc.reason}; cache path {dest}") from None
    except urllib.error.URLError as exc:
        reason = getattr(exc, "reason", exc)
        raise VitlabError(f"{address}: cannot download ({reason}); {placement_hint(url, dest)}, or set "
                          "VITLAB_OFFLINE=1 to work from the cache only") from None
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise VitlabError(f"{address}: cannot download ({exc}); {placement_hint(url, dest)}") from None
    with response:
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type.lower():
            raise VitlabError(f"{address}: the server sent an HTML page (Content-Type {content_type}), not the file; "
                              f"check the URL, or {placement_hint(url, dest)}")
        length = response.headers.get("Content-Length")
        if have and response.status == 206:
            start = have
        else:  # the server ignored the range (or there was none): start from the beginning
            start = 0
        total = start + int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise VitlabError(f"{address}: the server offers {total} bytes, the catalog says {size}; refused")
        make_bar(total, start)
        mode = "ab" if start else "wb"
        with open(part, mode) as out:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    return total


def _verify(part: Path, url: str, size: int | None, sha256: str | None) -> None:
    """Size, sha256 and "is it a checkpoint" checks of a complete download; the partial file is deleted on failure."""
    from ..checkpoints.files import sniff

    problem = None
    actual = part.stat().st_size
    if size is not None and actual != size:
        problem = f"downloaded {actual} bytes, the catalog says {size}"
    elif sha256 is not None:
        digest = _sha256(part)
        if digest != sha256.lower():
            problem = f"sha256 {digest} does not match the catalog's {sha256.lower()}"
    if problem is None:
        with open(part, "rb") as f:
            head = f.read(512).lstrip().lower()
        if head.startswith(_HTML_STARTS):
            problem = "the server sent an HTML page, not the file"
        else:
            try:
                sniff(part)
            except VitlabError as exc:
                problem = f"not a checkpoint ({str(exc).split(': ', 1)[-1]})"
    if problem is not None:
        part.unlink(missing_ok=True)
        raise VitlabError(f"{http_url(url)}: {problem}; the download was deleted, nothing was cached")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(part: Path, dest: Path) -> None:
    """Rename the verified download onto its final name and make the rename durable."""
    os.replace(part, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
