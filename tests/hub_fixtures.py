"""A real HTTP server on the loopback address, serving bytes the tests choose (with ``Range`` support, a transfer
cut after N bytes, HTML pages, slow chunks), and a Hugging Face Hub cache laid out as ``huggingface_hub`` writes it."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class _LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving one handler class until :meth:`stop`."""

    def _serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class FileServer(_LoopbackServer):
    """``files``: URL path -> bytes. ``cut_after``: the first response for a path stops after that many bytes and
    closes the connection. ``html``: answer every request with an HTML page. ``delay``: seconds between 64 KiB
    chunks. ``requests`` records (path, Range header) of every request. Every file has an ``ETag`` (its sha256) and
    ``If-Range`` is honoured, as real servers do. Broken servers: ``lie_length`` sends a ``Content-Length`` of half
    the body and only that half; ``no_length`` sends no ``Content-Length`` and closes after ``cut_after`` bytes
    (every time); ``whole_206`` answers a range request with ``206`` and the whole file; ``no_etag`` omits the ETag;
    ``redirects`` maps paths to the ``Location`` of a 302."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_after: int | None = None
        self.html = False
        self.html_as_binary = False
        self.delay = 0.0
        self.requests: list[tuple[str, str | None]] = []
        self.lie_length = self.no_length = self.whole_206 = self.no_etag = False
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        self._cut_done: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                owner.requests.append((self.path, self.headers.get("Range")))
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if owner.html:
                    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream" if owner.html_as_binary
                                     else "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                rng = self.headers.get("Range")
                if self.headers.get("If-Range") not in (None, etag):
                    rng = None  # the file changed since the partial copy: send it whole
                start = int(rng.split("=", 1)[1].split("-", 1)[0]) if rng else 0
                body = data[start:]
                if owner.whole_206 and start:
                    body = data
                if owner.lie_length:
                    body = body[: len(body) // 2]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                if not owner.no_etag:
                    self.send_header("ETag", etag)
                if owner.no_length:
                    self.close_connection = True
                    self.end_headers()
                    self.wfile.write(body[: owner.cut_after])
                    return
                self.send_header("Content-Length", str(len(body)))
                if start:  # whole_206: a Content-Range that claims the rest while the body is the whole file
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if owner.cut_after is not None and self.path not in owner._cut_done:
                    owner._cut_done.add(self.path)
                    self.wfile.write(body[: owner.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i: i + (1 << 16)])
                    if owner.delay:
                        time.sleep(owner.delay)

        self._serve(Handler)

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path`` (None: a plain GET)."""
        return [r for p, r in self.requests if p == path]


def offline_hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hub cache under ``tmp_path`` that ``huggingface_hub`` reads offline, and a fresh ``VITLAB_HOME``
    (``monkeypatch`` undoes both after the test). Returns the cache folder, for :func:`lay_out_hub_cache`."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "vitlab-home"))
    monkeypatch.delenv("VITLAB_OFFLINE", raising=False)
    return cache


def lay_out_hub_cache(cache: Path, repo: str, files: dict[str, bytes | str | dict],
                      commit: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main") -> Path:
    """A repo in the Hub cache as ``huggingface_hub`` stores it: ``models--org--name/snapshots/<commit>/<file>`` and
    ``refs/<ref>`` holding the commit. Returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, dict):
            content = json.dumps(content)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


class LoopbackHub(_LoopbackServer):
    """The part of the Hugging Face Hub's HTTP interface ``hf_hub_download`` uses, on 127.0.0.1:
    ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}`` answering with ``X-Repo-Commit`` and ``ETag``, and the
    repo's info and file list at ``/api/models/{org}/{name}[/revision/{revision}]`` and ``.../tree/{revision}``
    (what ``hf download`` with several files asks); an unknown repo gets ``X-Error-Code: RepoNotFound``, a missing
    file ``EntryNotFound``. ``repos``: repo -> {file: bytes}. ``headers``: header -> value sent on every answer
    instead of the usual one (a hostile endpoint's ``ETag``).

    It also takes uploads as ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` send them
    (``POST /api/repos/create``, ``/api/models/{repo}/branch/{branch}``, ``.../preupload/{revision}`` answering
    ``uploadMode: regular`` for every file, so that nothing goes through LFS or xet, and ``.../commit/{revision}``
    with the NDJSON of base64 file contents); what is committed is served back (a branch at ``resolve/{branch}``)
    and recorded in ``commits``."""

    def __init__(self, repos: dict[str, dict[str, bytes]], commit: str = "c" * 40):
        self.repos, self.commit, self.requests = repos, commit, []
        self.headers: dict[str, str] = {}
        self.branches: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, branch) -> files, for uploads
        self.created: dict[str, dict] = {}  # repo -> the create request's JSON
        self.heads: dict[tuple[str, str], str] = {}  # (repo, branch) -> its last commit
        self.snapshots: dict[str, dict[str, bytes]] = {}  # commit -> the files it holds (resolve/<commit>/...)
        self.commits: list[dict] = []  # every commit: repo, revision, header, files, authorization
        self.card_metadata = None  # the last README.md front matter sent to /api/validate-yaml
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, data, error: str | None = None) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                if error:
                    self.send_header("X-Error-Code", error)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):  # the upload interface: create a repo, a branch, preupload, commit
                owner.requests.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else request["name"]
                    if repo in owner.repos:
                        self._json(409, {"error": "You already created this model repo", "url": f"{owner.url}/{repo}"})
                        return
                    owner.repos[repo], owner.created[repo] = {}, request
                    self._json(200, {"url": f"{owner.url}/{repo}", "name": repo})
                    return
                if parts == ["api", "validate-yaml"]:  # the model card's front matter, as the Hub checks it
                    content = json.loads(body)["content"]
                    try:
                        owner.card_metadata = yaml.safe_load(content.split("---")[1])
                    except (IndexError, yaml.YAMLError) as exc:
                        self._json(400, {"error": f"invalid YAML: {exc}"})
                        return
                    self._json(200 if isinstance(owner.card_metadata, dict) else 400, {"warnings": []})
                    return
                if parts[:2] != ["api", "models"] or len(parts) < 6 or "/".join(parts[2:4]) not in owner.repos:
                    self._json(404, {"error": "Repository not found"}, "RepoNotFound")
                    return
                repo, action, revision = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                if action == "branch":
                    owner.branches.setdefault((repo, revision), dict(owner.repos[repo]))
                    self._json(200, {})
                elif action == "preupload":  # every file as a regular git blob: no LFS, no xet transfer
                    files = json.loads(body)["files"]
                    self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
                elif action == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    added = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    target = owner.repos[repo] if revision == "main" else owner.branches[(repo, revision)]
                    target.update(added)
                    for x in lines:
                        if x["key"] == "deletedFile":
                            target.pop(x["value"]["path"], None)
                    digests = sorted((k, hashlib.sha256(v).hexdigest()) for k, v in target.items())
                    owner.commit = owner.heads[(repo, revision)] = hashlib.sha1(
                        json.dumps([repo, revision, digests]).encode()).hexdigest()
                    owner.snapshots[owner.commit] = dict(target)
                    owner.commits.append({"repo": repo, "revision": revision, "header": header, "files": added,
                                          "authorization": self.headers.get("Authorization")})
                    self._json(200, {"success": True, "commitOid": owner.commit,
                                     "commitUrl": f"{owner.url}/{repo}/commit/{owner.commit}"})
                else:
                    self._json(404, {"error": f"no {action} here"})

            def _answer(self, body: bool) -> None:
                owner.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:  # the repo's file list (`hf download`)
                    repo = "/".join(parts[2:4])
                    revision = parts[5] if len(parts) > 5 and parts[4] in ("revision", "tree") else "main"
                    sha = owner.heads.get((repo, revision), owner.commit)
                    files = owner.snapshots.get(sha, owner.repos.get(repo)) if repo in owner.repos else None
                    if files is None:
                        info = None
                    elif len(parts) > 4 and parts[4] == "tree":
                        info = json.dumps([{"type": "file", "path": f, "size": len(data),
                                            "oid": hashlib.sha1(data).hexdigest()} for f, data in files.items()])
                    else:
                        info = json.dumps({"id": repo, "sha": sha,
                                           "siblings": [{"rfilename": f} for f in files]})
                    info = info.encode() if info else None
                    self.send_response(404 if info is None else 200)
                    if info is None:
                        self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(info or b"")))
                    self.end_headers()
                    if body and info:
                        self.wfile.write(info)
                    return
                if len(parts) < 5 or parts[2] != "resolve":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                files = owner.branches.get((repo, parts[3]), owner.snapshots.get(parts[3], owner.repos.get(repo)))
                head = owner.heads.get((repo, parts[3]), parts[3] if parts[3] in owner.snapshots else owner.commit)
                data = None if files is None else files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound" if files is None else "EntryNotFound")
                    if files is not None:
                        self.send_header("X-Repo-Commit", owner.headers.get("X-Repo-Commit", head))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                headers = {"X-Repo-Commit": head, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Content-Length": str(len(data)), **owner.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self._serve(Handler)
