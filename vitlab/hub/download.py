"""Downloading a checkpoint from a URL into the cache: resumable, checked, atomic, safe under concurrency.

:func:`fetch` returns the cached file when it is there (no network at all); otherwise it downloads to
``<name>.part`` next to the final file, resuming a partial download with an HTTP ``Range`` request (also after the
connection drops mid-way, but only with the validator the partial file came with), checks the result (size and sha256
when known, that it is a checkpoint rather than an HTML page, and that its own structure shows it whole:
:func:`structure_problem`), and only then renames it onto the final name. A lock file makes a second process that
wants the same file wait for the first and then use its result. A failed check deletes the partial file; a cached
file is used as it is unless its structure shows it cut (then it is fetched again).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import pickletools
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import VitlabError
from .cache import cache_path, http_url, offline_mode, vitlab_home

CHUNK = 1 << 20
RETRIES = 5
TIMEOUT = 60.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
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
    is a terminal). ``offline`` (default: :func:`~vitlab.hub.cache.offline_mode`) refuses any download. A cached
    copy whose structure shows it incomplete (see :func:`structure_problem`) is downloaded again (offline: an error
    naming the file to delete). Raises :class:`VitlabError` with one line naming the URL, the cache path and how to
    place the file by hand."""
    dest = cache_path(url)
    _refuse_links(dest)
    offline = offline_mode() if offline is None else offline
    if dest.is_file() and _check_cached(dest, size, url, offline):
        return dest
    if offline:
        raise VitlabError(f"{url}: not in the cache and network use is off (VITLAB_OFFLINE / HF_HUB_OFFLINE / "
                          f"--offline); {placement_hint(url, dest)}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(dest.with_name(dest.name + ".lock")):
            _refuse_links(dest)  # again, now that no other vitlab process is writing here
            if dest.is_file() and _check_cached(dest, size, url, offline):  # another process finished it meanwhile
                return dest
            part = dest.with_name(dest.name + ".part")
            # an interrupted download keeps ``part`` (and what it was fetched from, in ``<name>.part.json``) so
            # that the next call resumes it; a failed check deletes both
            _download(url, part, size, sys.stderr.isatty() if progress is None else progress)
            _verify(part, url, size, sha256)
            _publish(part, dest)
            _meta_path(part).unlink(missing_ok=True)
    except OSError as exc:  # a read-only or full disk, a file where a folder should be: the cache, not the server
        where = exc.filename or dest.parent
        raise VitlabError(f"{http_url(url)}: cannot write to the download cache ({where}: {exc.strerror or exc}); "
                          "free some space or set VITLAB_HOME to a writable folder (a partial download is kept "
                          "and resumed)") from None
    return dest


def _refuse_links(dest: Path) -> None:
    """Refuse a cache entry reached through a symlink: its ``.part`` / ``.lock`` / ``.part.json`` companions and every
    folder between ``$VITLAB_HOME`` and it must be real, so that nothing is written outside the cache.
    ``$VITLAB_HOME`` itself may be a link, and so may the final name (a file placed by hand is used where it is; a
    download never writes through it, the rename replaces the link)."""
    home = vitlab_home()
    names = [dest.with_name(dest.name + suffix) for suffix in (".part", ".lock", ".part.json")]
    for path in [*names, *dest.parents]:
        if path == home or home not in path.parents:
            break
        if path.is_symlink():
            raise VitlabError(f"{path}: a symlink inside the download cache {home}; refused (it could lead writes "
                              "outside the cache); remove it")
        if path in names and path.exists() and not path.is_file():
            raise VitlabError(f"{path}: not a regular file; refused; remove it")


def _check_cached(dest: Path, size: int | None, url: str, offline: bool) -> bool:
    """Whether the cached ``dest`` can be used; an incomplete one is deleted (``False``: fetch it again), or, offline,
    an error naming it."""
    if size is not None and dest.stat().st_size != size:
        raise VitlabError(f"{dest}: cached copy of {url} has {dest.stat().st_size} bytes, the catalog says {size}; "
                          "delete it to download the file again")
    problem = structure_problem(dest)
    if problem is None:
        return True
    if offline:
        raise VitlabError(f"{dest}: the cached copy of {url} is incomplete or corrupt ({problem}); delete {dest} "
                          "and download it again (network use is off)")
    print(f"vitlab: {dest}: the cached copy is incomplete or corrupt ({problem}); downloading it again",
          file=sys.stderr)
    dest.unlink(missing_ok=True)
    return False


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the block; other processes block until it is released."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock (documented)
        yield
        return
    with os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666), "r+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _resumable(part: Path, address: str) -> dict | None:
    """What the partial file ``part`` was fetched from (address, validator, full size), when it can be resumed: a
    ``.part`` without that record, or from another address, or whose server gave no validator (``ETag`` /
    ``Last-Modified``) cannot be known to belong to this file, and is deleted."""
    meta = None
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads(_meta_path(part).read_text())
    if isinstance(meta, dict) and meta.get("address") == address and isinstance(meta.get("validator"), str) \
            and part.exists():
        return meta
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)
    return None


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
            meta = _resumable(part, address)
            have = part.stat().st_size if meta is not None else 0
            try:
                total = _transfer(address, url, part, have, meta, size, advance, make_bar)
                got = part.stat().st_size
                if total is not None and got < total:
                    raise http.client.IncompleteRead(b"", total - got)
                if total is not None and got > total:
                    _discard(part)
                    raise VitlabError(f"{address}: the server sent {got} bytes for a {total}-byte file; the download "
                                      "was deleted, nothing was cached")
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


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes FIRST-LAST/TOTAL`` as three numbers (None when absent or malformed, or TOTAL is ``*``)."""
    match = re.fullmatch(r"\s*bytes\s+(\d{1,18})-(\d{1,18})/(\d{1,18})\s*", value or "")
    if match is None:
        return None
    first, last, total = (int(g) for g in match.groups())
    return (first, last, total) if first <= last < total else None


def _transfer(address: str, url: str, part: Path, have: int, meta: dict | None, size: int | None, advance,
              make_bar) -> int | None:
    """One HTTP request: append the rest of the file to ``part`` (from byte ``have``); returns the full size (None
    when the server did not say). A resumed request carries ``If-Range`` (the validator the first part came with),
    so a file changed on the server comes whole; a ``206`` must continue exactly at ``have``."""
    headers = {"User-Agent": "vitlab", "Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": meta["validator"]})
    request = urllib.request.Request(address, headers=headers)
    dest = part.with_name(part.name[: -len(".part")])
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch, or a stale partial file: start again
            _discard(part)
            raise ConnectionError("range not satisfiable") from None
        reason = " ".join(str(exc.reason).split())  # urllib's redirect-loop reason spans three lines
        raise VitlabError(f"{address}: the server answered {exc.code} {reason}; cache path {dest}") from None
    except urllib.error.URLError as exc:
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
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
        length = int(length) if length is not None and length.strip().isdigit() else None
        if response.status == 206:
            span = _content_range(response.headers.get("Content-Range"))
            if span is None or span[0] not in (0, have) or (length is not None and length != span[1] - span[0] + 1):
                _discard(part)  # a 206 that does not continue this file: start again from the first byte
                raise ConnectionError(f"206 with Content-Range {response.headers.get('Content-Range')!r} "
                                      f"for a request from byte {have}")
            start, total = span[0], span[2]
        else:  # the server ignored the range (or there was none): start from the beginning
            start, total = 0, length
        if size is not None and total is not None and total != size:
            raise VitlabError(f"{address}: the server offers {total} bytes, the catalog says {size}; refused")
        if start == 0:
            validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            if validator is not None and validator.startswith("W/"):
                validator = None  # a weak ETag cannot validate a byte range (RFC 9110, If-Range)
            write_text_atomic(_meta_path(part), json.dumps({"address": address, "validator": validator,
                                                            "total": total}))
        make_bar(total, start)
        # O_NOFOLLOW: a symlink put in place of ``part`` since the check is refused, not written through
        flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_APPEND if start else os.O_TRUNC)
        try:
            fd = os.open(part, flags, 0o666)
        except OSError as exc:
            raise VitlabError(f"cannot write {part}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as out:
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
    """Size, sha256, "is it a checkpoint" and "is it whole" checks of a complete download; the partial file is
    deleted on failure."""
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
    if problem is None:
        problem = structure_problem(part)
        if problem is not None:
            problem = f"the file is incomplete or corrupt ({problem})"
    if problem is not None:
        _discard(part)
        raise VitlabError(f"{http_url(url)}: {problem}; the download was deleted, nothing was cached")


# bytes per element of the safetensors dtypes and of legacy torch.save's storage classes
_SAFETENSORS_ITEM = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                     "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_TORCH_STORAGE_ITEM = {"UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1,
                       "QUInt8Storage": 1, "QInt8Storage": 1, "ShortStorage": 2, "HalfStorage": 2,
                       "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "QInt32Storage": 4,
                       "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def structure_problem(path: Path) -> str | None:
    """Why the checkpoint file at ``path`` is not whole, from its own structure (None: it is, or the format has no
    such structure): a safetensors file must end where its last tensor does; a zip (``.npz``, ``torch.save``) must
    start with its first member, hold each member at its declared offset and end with its central directory; a
    legacy ``torch.save`` file must end with its last storage. Reads headers and seeks, never the data."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                return _zip_problem(f, size)
            if head[:1] == b"\x80":
                return _legacy_torch_problem(f, size)
            if len(head) == 8 and f.read(1) == b"{":
                return _safetensors_problem(f, struct.unpack("<Q", head)[0], size)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def _safetensors_problem(f, header_len: int, size: int) -> str | None:
    if 8 + header_len > size or header_len > 100 * 2**20:
        return f"{size} bytes, the safetensors header alone declares {8 + header_len}"
    f.seek(8)
    try:
        header = json.loads(f.read(header_len))
    except (ValueError, RecursionError):
        return "the safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return "the safetensors header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {str(name)[:60]!r} has no valid data_offsets"
        item = _SAFETENSORS_ITEM.get(entry.get("dtype"))
        shape = entry.get("shape")
        if item is not None and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            if math.prod(shape) * item != offsets[1] - offsets[0]:
                return f"tensor {str(name)[:60]!r} declares shape {shape} but {offsets[1] - offsets[0]} bytes"
        end = max(end, offsets[1])
    if 8 + header_len + end != size:
        return f"{size} bytes, the safetensors header declares {8 + header_len + end}"
    return None


def _zip_problem(f, size: int) -> str | None:
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            start_dir = archive.start_dir
            comment = len(archive.comment)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        return f"the zip archive is cut or corrupt ({exc})"
    if not infos:
        return "an empty zip archive"
    if min(info.header_offset for info in infos) != 0:  # zipfile tolerates bytes around the archive; we do not
        return "bytes before the first zip member"
    f.seek(size - 22 - comment)
    if f.read(4) != b"PK\x05\x06":
        return "bytes after the zip archive's end record"
    for info in infos:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return f"zip member {info.filename[:60]!r} is not at its declared offset"
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        if info.header_offset + 30 + name_len + extra_len + info.compress_size > start_dir:
            return f"zip member {info.filename[:60]!r} runs past the central directory"
    return None


def _legacy_torch_problem(f, size: int) -> str | None:
    """Walk the pickles of a pre-1.6 ``torch.save`` file (magic, protocol, system info, the object, the storage keys;
    never unpickled, only their opcodes read) and then its raw storages: 8 bytes of element count each, then the
    elements, sized by the storage classes the object's pickle names."""
    f.seek(0)
    item_of_key: dict[str, int] = {}
    keys: list[str] = []
    try:
        for index in range(5):
            strings: list[str] = []
            memo: dict = {}
            last = pending_item = None
            for opcode, arg, _ in pickletools.genops(f):
                name = opcode.name
                if index == 0 and name == "LONG1" and arg != _TORCH_LEGACY_MAGIC:
                    return None  # not a torch.save file: nothing to check here
                if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):  # the pickler's memo: repeats are GETs
                    memo[len(memo) if name == "MEMOIZE" else arg] = last
                    continue
                if name in ("GET", "BINGET", "LONG_BINGET"):
                    value = memo.get(arg)
                elif name == "GLOBAL" and isinstance(arg, str) and arg.startswith("torch "):
                    value = ("class", arg.split(" ", 1)[1])
                elif name == "STACK_GLOBAL" and len(strings) >= 2 and strings[-2] == "torch":
                    value = ("class", strings[-1])
                else:
                    value = arg if isinstance(arg, str) and "UNICODE" in name else None
                last = value
                if isinstance(value, tuple):
                    pending_item = _TORCH_STORAGE_ITEM.get(value[1])
                    continue
                if isinstance(value, str):
                    strings.append(value)
                    if pending_item is not None:  # a storage class is followed by the storage's key
                        item_of_key.setdefault(value, pending_item)
                pending_item = None
            if index == 4:
                keys = strings
    except (ValueError, EOFError, RecursionError):
        return "cut inside its pickled part"
    offset = f.tell()
    for key in keys:
        item = item_of_key.get(key)
        if item is None:
            return None  # a storage class this walk does not know: cannot tell
        f.seek(offset)
        count = f.read(8)
        if len(count) < 8:
            return f"{size} bytes, cut before storage {key[:20]!r}"
        offset += 8 + struct.unpack("<q", count)[0] * item
        if offset > size:
            return f"{size} bytes, storage {key[:20]!r} ends at byte {offset}"
    if offset != size:
        return f"{size} bytes, the storages end at byte {offset}"
    return None


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
