"""Where downloaded checkpoints live, and whether the network may be used.

- ``$VITLAB_HOME`` (default ``~/.cache/vitlab``) holds files fetched from URLs: ``gs://bucket/path`` is cached as
  ``$VITLAB_HOME/gcs/bucket/path`` and ``https://host/path`` as ``$VITLAB_HOME/url/host/path``. A file put there by
  hand is used as if vitlab had downloaded it.
- Hugging Face Hub repos stay in the Hub's own cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``).
- Offline: ``VITLAB_OFFLINE=1`` (the CLI's ``--offline``) or ``HF_HUB_OFFLINE=1`` forbids network use; a file that is
  not cached is then an error saying which file and where to place it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from ..errors import VitlabError
from ..home import vitlab_home

GCS_ENDPOINT = "https://storage.googleapis.com"
_TRUE = {"1", "true", "yes", "on"}


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache as ``huggingface_hub`` computes it, read now rather than at its import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def offline_mode() -> bool:
    """Whether network use is forbidden: ``VITLAB_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1 / true / yes / on."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("VITLAB_OFFLINE", "HF_HUB_OFFLINE"))


# host:port -> (whether a TCP connection opened, when): a machine without network answers every download at once
# instead of after the Hub client's retries (about 30 s per file); probed again after a minute for long-lived
# processes (a server, a notebook) whose network comes back
_REACHABLE: dict[tuple[str, int], tuple[bool, float]] = {}
_PROBE_AGAIN_AFTER = 60.0


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host (or the proxy the environment sets for it) opens within
    ``timeout`` seconds; probed at most once a minute per host. Any failure to connect (no DNS, refused,
    unreachable, timed out) counts as no network."""
    split = urlsplit(url)
    host, port = split.hostname or "", split.port or (443 if split.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(split.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_split = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_split.hostname or "", proxy_split.port or 80
    known = _REACHABLE.get((host, port))
    if known is None or time.monotonic() - known[1] > _PROBE_AGAIN_AFTER:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            known = (True, time.monotonic())
        except OSError:
            known = (False, time.monotonic())
        _REACHABLE[(host, port)] = known
    return known[0]


def http_url(url: str) -> str:
    """The HTTPS address of a ``gs://`` URL (``$VITLAB_GCS_ENDPOINT`` overrides the storage host, for mirrors);
    other URLs unchanged. ``+`` and other reserved characters in object names are percent-encoded."""
    if not url.startswith("gs://"):
        return url
    bucket, _, name = url[len("gs://"):].partition("/")
    endpoint = os.environ.get("VITLAB_GCS_ENDPOINT", GCS_ENDPOINT).rstrip("/")
    return f"{endpoint}/{bucket}/{quote(name, safe='/')}"


def cache_path(url: str) -> Path:
    """The file a URL is cached as under :func:`vitlab_home` (``gcs/<bucket>/<object>`` or ``url/<host>/<path>``;
    a query string adds a short hash to the name)."""
    if url.startswith("gs://"):
        parts = ["gcs", *url[len("gs://"):].split("/")]
    else:
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise VitlabError(f"{_shown(strip_credentials(url))}: not a gs://, http:// or https:// URL")
        if "@" in split.netloc:  # the name of a cache folder and every message would carry the secret
            raise VitlabError(f"{_shown(strip_credentials(url))}: a user name or password in the URL is refused "
                              "(it would end up in the cache path and in messages); use a URL without credentials")
        parts = ["url", split.netloc.replace(":", "_"), *unquote(split.path).split("/")]
        if split.query:
            digest = hashlib.sha256(split.query.encode()).hexdigest()[:10]
            parts[-1] = f"{parts[-1]}-{digest}"
    parts = [p for p in parts if p]
    if any(p in (".", "..") for p in parts) or len(parts) < 3:
        raise VitlabError(f"{url}: no file name in the URL (or '.' / '..' in its path)")
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for p in parts for c in p):
        raise VitlabError(f"{_shown(url)}: a control character, NUL or backslash in the URL's path; refused")
    return vitlab_home().joinpath(*[_short_name(p) for p in parts])


def strip_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages."""
    split = urlsplit(url)
    if "@" not in split.netloc:
        return url
    return split._replace(netloc=split.netloc.rpartition("@")[2]).geturl()


def _short_name(part: str, most: int = 200) -> str:
    """``part`` as a file or folder name: unchanged when it has at most ``most`` bytes (file systems allow 255, and
    the download adds ``.part.json``), else its first bytes plus a hash of the whole, so that names stay distinct."""
    encoded = part.encode("utf-8", "surrogateescape")
    if len(encoded) <= most:
        return part
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    stem, dot, suffix = part.rpartition(".")
    suffix = f".{suffix}" if dot and 0 < len(suffix.encode()) <= 16 else ""
    keep = encoded[: most - 17 - len(suffix.encode())].decode("utf-8", "ignore")
    return f"{keep}-{digest}{suffix}"


def _shown(text: str) -> str:
    """``text`` cut to 200 characters with control characters escaped, for a one-line message."""
    return text[:200].encode("unicode_escape").decode("ascii")
