"""The HTTP application: endpoints, limits, API key, metrics and the web page, around an :class:`Engine` and a
:class:`Batcher`.

Endpoints (all answers JSON but ``/``, ``/metrics`` and the page's assets; every error is ``{"error": "one line"}``):

- ``POST /v1/classify``: images as ``multipart/form-data`` file parts (any field name), as JSON
  ``{"images": ["<base64>", ...]}`` (or ``{"image": ...}``; items may be ``{"data": ..., "name": ...}`` or data URLs),
  or one image as the raw body (``Content-Type: image/...``). ``.npy`` arrays and multi-band TIFFs (models of other
  than 1 or 3 input channels) are sent the same ways. Option ``top_k`` (form field, JSON key or query).
- ``POST /v1/explain``: the same, plus each image's attention rollout (``head_fusion``, ``discard_ratio``) as
  numbers and as a PNG overlay (base64).
- ``GET /v1/model``: the model card; ``GET /healthz``; ``GET /metrics`` (Prometheus text format); ``GET /``: the page.

Status codes: 400 bad input (not an image, truncated, too many pixels, bad base64 / JSON / option), 401 missing or
wrong API key, 413 body over the limit, 415 unsupported content type, 501 rollout with a backend that has no
attention, 503 queue full (with ``Retry-After``) or shutting down.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources

import anyio
import anyio.to_thread
import torch
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..errors import VitlabError
from .batching import Batcher, BatcherClosed, QueueFull
from .engine import HEAD_FUSIONS, Engine, load_engine
from .metrics import Metrics, endpoint_label

log = logging.getLogger("vitlab.serve")
PROTECTED_PREFIXES = ("/v1/", "/metrics")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one app. Sizes are bytes, pixels and images; ``max_queue`` counts images waiting."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 128
    max_body_bytes: int = 16 * 2**20
    max_images: int = 16
    max_pixels: int = 25_000_000
    max_request_pixels: int = 50_000_000
    default_top_k: int = 5
    api_key: str | None = None
    body_timeout_s: float = 30.0
    max_prompts: int = 256  # zero-shot: labels x templates one request may name (bounds the text tower's work)

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least 1, got {getattr(self, name)}"
                    for name in ("max_batch", "max_queue", "max_body_bytes", "max_images", "max_pixels",
                                 "max_request_pixels", "default_top_k", "max_prompts") if getattr(self, name) < 1]
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if not self.body_timeout_s > 0:
            problems.append(f"body_timeout_s must be positive, got {self.body_timeout_s}")
        if self.max_images > self.max_queue:
            problems.append(f"max_images ({self.max_images}) cannot exceed max_queue ({self.max_queue})")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty")
        if problems:
            raise VitlabError("invalid server settings: " + "; ".join(problems))

    def public(self) -> dict:
        """The limits a client may know (everything but the key)."""
        out = asdict(self)
        out.pop("api_key")
        out["api_key_required"] = self.api_key is not None
        return out


class ApiError(Exception):
    """An answer with an error status and a one-line reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, " ".join(str(message).split()), headers or {}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware in front of the routes: API key, body-size limit (declared and streamed), and the request
    metrics (status and latency of every request, whatever answered it)."""

    def __init__(self, app, service: _Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        service = self.service
        endpoint = endpoint_label(scope.get("path", ""))
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            problem, drain = self._check(scope)
            if problem is not None:
                if drain:
                    await _drain(receive, 4 * service.settings.max_body_bytes)
                await problem(scope, receive, send_counted)
                return
            limit = service.settings.max_body_bytes
            received = [0]
            timeout = service.settings.body_timeout_s
            deadline = [start + timeout]  # the whole body within body_timeout_s of the headers

            async def receive_limited():
                if deadline[0] is None:  # the body is complete: waiting for a disconnect has no deadline
                    return await receive()
                try:
                    with anyio.fail_after(max(deadline[0] - time.perf_counter(), 0.0)):
                        message = await receive()
                except TimeoutError:
                    raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                                   {"Connection": "close"}) from None
                if message["type"] != "http.request" or not message.get("more_body"):
                    deadline[0] = None
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > limit:
                        if message.get("more_body"):
                            await _drain(receive, 3 * limit)
                        raise ApiError(413, f"request body over the limit of {limit:,} bytes")
                return message

            await self.app(scope, receive_limited, send_counted)
        finally:
            service.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)

    def _check(self, scope) -> tuple[Response | None, bool]:
        """An early answer (API key, declared body size) or None, and whether to read the body first."""
        settings = self.service.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if settings.api_key is not None and path.startswith(PROTECTED_PREFIXES):
            given = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if given is None:
                return _error(401, "missing API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                              {"WWW-Authenticate": "Bearer"}), self._small_body(headers)
            if not hmac.compare_digest(given.encode("utf-8", "replace"), settings.api_key.encode("utf-8")):
                return _error(401, "wrong API key", {"WWW-Authenticate": "Bearer"}), self._small_body(headers)
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return _error(400, f"bad Content-Length header {length[:40]!r}"), False
            if size > settings.max_body_bytes:
                return _error(413, f"request body of {size:,} bytes is over the limit of "
                                   f"{settings.max_body_bytes:,} bytes"), self._small_body(headers)
        return None, False

    def _small_body(self, headers: dict) -> bool:
        """Whether to read (and drop) a refused request's body before answering: clients that are still sending
        when the connection closes see a broken pipe instead of the answer. Not for bodies far over the limit,
        nor for clients waiting for '100 Continue' (they send nothing until told)."""
        if headers.get("expect", "").lower() == "100-continue":
            return False
        try:
            size = int(headers.get("content-length", "0"))
        except ValueError:
            return False
        return size <= 4 * self.service.settings.max_body_bytes


async def _drain(receive, most: int) -> None:
    """Read and drop up to ``most`` more bytes of a request body."""
    seen = 0
    while seen <= most:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


class _Service:
    """Everything one app holds: the engine, settings, metrics and the batcher."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.metrics = Metrics()
        self.metrics.info.info({"name": engine.name, "backend": engine.backend, "device": str(engine.device),
                                "vitlab_version": __version__})
        self.batcher = Batcher(engine.run_batch, max_batch=settings.max_batch,
                               max_wait_s=settings.max_wait_ms / 1000.0, max_queue=settings.max_queue,
                               on_batch=self.metrics.observe_batch, on_queue=self.metrics.queue_length.set)
        self.closing = False
        self._decode_limiter = None

    def decode_limiter(self):
        """At most as many images decode at once as there are CPUs: decoded pixels are the big allocations (a
        25-megapixel upload is 75 MB as RGB), so their number, not the connections', bounds the memory."""
        if self._decode_limiter is None:  # created in the running loop, on first use
            import anyio

            self._decode_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
        return self._decode_limiter


def _display_name(raw: str | None) -> str | None:
    """A client's file name as shown back to it: printable, at most 100 characters; never used as a path."""
    if not raw:
        return None
    # any printable character is kept (accents, CJK, emoji: names are Unicode); control and format characters,
    # path separators, quotes and angle brackets become "_"
    return "".join(c if c.isprintable() and c not in "/\\<>\"'`" else "_" for c in raw[:100]) or None


def _decode_base64(text: str, label: str) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, f"{label}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ApiError(400, f"{label}: a data URL must be base64-encoded")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{label}: invalid base64 ({exc})") from exc


async def _read_request(request: Request, settings: ServeSettings) -> tuple[list[tuple[str | None, bytes]], dict]:
    """The uploaded images as (display name, bytes) and the options, from any of the accepted body forms."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict = dict(request.query_params)
    images: list[tuple[str | None, bytes]] = []
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images, max_fields=32)
        except StarletteHTTPException as exc:
            if "too many files" in str(exc.detail).lower():
                raise ApiError(400, f"more than {settings.max_images} images in one request; the limit is "
                                    f"{settings.max_images}") from exc
            raise ApiError(400, f"bad multipart body: {exc.detail}") from exc
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    images.append((_display_name(value.filename), await value.read()))
                else:
                    options[key] = value
        finally:
            await form.close()
    elif media == "application/json":
        body = _parse_json(await request.body())
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object with 'images' (a list) or 'image'")
        items = body.pop("images", None)
        if items is None and "image" in body:
            items = [body.pop("image")]
        if not isinstance(items, list):
            raise ApiError(400, "the JSON body needs 'images' (a list of base64 strings) or 'image'")
        if len(items) > settings.max_images:
            raise ApiError(400, f"{len(items)} images in one request; the limit is {settings.max_images}")
        for i, item in enumerate(items):
            label = f"image {i}"
            if isinstance(item, dict):
                name = item.get("name")
                images.append((_display_name(name if isinstance(name, str) else None),
                                _decode_base64(item.get("data"), label)))
            else:
                images.append((None, _decode_base64(item, label)))
        options.update(body)
    elif media.startswith("image/") or media == "application/octet-stream":
        images.append((None, await request.body()))
    else:
        raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send multipart/form-data, "
                            "application/json (base64 images) or an image/* body")
    if not images:
        raise ApiError(400, "no image in the request")
    if len(images) > settings.max_images:
        raise ApiError(400, f"{len(images)} images in one request; the limit is {settings.max_images}")
    return images, options


def _parse_json(raw: bytes):
    """A request's JSON body, or a 400 with a one-line reason: also for what Python's parser accepts or fails on
    beyond the JSON standard (``NaN`` / ``Infinity``, integers of more than 20 digits, nesting deeper than the
    interpreter's recursion limit)."""
    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > 20:
            raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits")
        return int(digits)

    try:
        return json.loads(raw, parse_constant=constant, parse_int=integer)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"body is not valid JSON ({str(exc)[:200]})") from None


def _shown(value) -> str:
    """A client's option value in a message: a string or number (cut to 40 characters), else its JSON type (a
    nested list's repr could be huge or recurse past the interpreter's limit)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return repr(str(value)[:40]) if isinstance(value, str) else repr(value)[:40]
    return f"a JSON {type(value).__name__}"


def _int_option(options: dict, name: str, default: int, low: int) -> int:
    value = options.get(name, default)
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"{name} must be an integer, got {_shown(value)}") from None
    if number < low:
        raise ApiError(400, f"{name} must be at least {low}, got {number}")
    return number


def _explain_options(options: dict) -> tuple[str, float]:
    fusion = options.get("head_fusion", "mean")
    if fusion not in HEAD_FUSIONS:
        raise ApiError(400, f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {_shown(fusion)}")
    try:
        discard = float(options.get("discard_ratio", 0.0))
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, "discard_ratio must be a number in [0, 1)") from None
    if not 0.0 <= discard < 1.0:
        raise ApiError(400, f"discard_ratio must be in [0, 1), got {discard}")
    return fusion, discard


MAX_LABEL_CHARS = 200  # one zero-shot label or template, in characters


def _text_list(value, what: str) -> list[str]:
    """A request's labels / templates: a JSON list of strings, or one comma-separated string (a form field, the
    query). Each stripped, non-empty and at most :data:`MAX_LABEL_CHARS` long."""
    if isinstance(value, str):
        items = value.split(",") if what == "labels" else [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise ApiError(400, f"{what} must be a list of strings or one string, got {_shown(value)}")
    items = [item.strip() for item in items]
    if not items or not all(items):
        raise ApiError(400, f"{what}: an empty entry in {_shown(value)}")
    long = next((item for item in items if len(item) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise ApiError(400, f"{what}: {_shown(long)} is longer than {MAX_LABEL_CHARS} characters")
    return items


def _zero_shot_request(options: dict, engine: Engine, settings: ServeSettings) -> tuple[list[str], list[str] | None]:
    """The labels (the request's, else the server's default classes) and templates (None: the server's) a zero-shot
    request asks for, refused beyond ``max_prompts`` labels x templates."""
    raw = options.get("labels")
    if raw is None:
        if not engine.named_classes:
            raise ApiError(400, "name the classes: 'labels', a list of strings (JSON) or comma-separated (form "
                                "field, query)")
        labels = engine.class_names
    else:
        labels = _text_list(raw, "labels")
    templates = _text_list(options["template"], "template") if "template" in options else None
    prompts = len(labels) * len(templates or engine.prompts.templates)
    if prompts > settings.max_prompts:
        raise ApiError(400, f"{len(labels)} labels x {len(templates or engine.prompts.templates)} templates are "
                            f"{prompts} prompts; the limit per request is {settings.max_prompts}")
    return labels, templates


def create_app(model, *, backend: str = "torch", device: str = "cpu", name: str | None = None,
               threads: int | None = None, settings: ServeSettings | None = None, **limits):
    """The ASGI app (FastAPI) serving ``model``: a model object, any checkpoint or name ``vitlab.load`` reads, an
    ``.onnx`` file, or a ready :class:`Engine`.

    ``backend``: ``torch`` or ``onnx-int8`` (see :func:`load_engine`). Limits and batching come from ``settings`` or
    as keywords (the fields of :class:`ServeSettings`: ``max_batch``, ``max_wait_ms``, ``max_queue``,
    ``max_body_bytes``, ``max_images``, ``max_pixels``, ``max_request_pixels``, ``default_top_k``, ``api_key``,
    ``body_timeout_s``). Mount it in another ASGI app, or run it with uvicorn (``vitlab serve`` does)."""
    from fastapi import FastAPI

    if settings is None:
        settings = ServeSettings(**limits)
    elif limits:
        raise TypeError("give either settings or limit keywords, not both")
    engine = model if isinstance(model, Engine) else load_engine(model, backend=backend, device=device, name=name,
                                                                 threads=threads)
    service = _Service(engine, settings)
    page = {path: (resources.files(__package__).joinpath("page", file).read_bytes(), kind)
            for path, (file, kind) in PAGE_FILES.items()}

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        warm = torch.zeros(1, *engine.input_shape())
        await service.batcher.run_once(("classify",), warm)  # first-call costs (allocations, kernels) paid here
        if engine.prompts is not None and engine.named_classes:  # the default classes' text embeddings, cached now
            await anyio.to_thread.run_sync(engine.prompts, engine.class_names)
        if engine.can_explain:
            await service.batcher.run_once(("explain", "mean", 0.0), warm)
        log.info("serving %s (%s on %s)", engine.name, engine.backend, engine.device)
        try:
            yield
        finally:
            service.closing = True
            await service.batcher.close()  # every image already accepted is answered first

    app = FastAPI(title="vitlab serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.vitlab = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 else f"not found: {request.url.path[:100]}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("error answering %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__})")

    async def answer(request: Request, explain: bool) -> JSONResponse:
        start = time.perf_counter()
        if service.closing:
            raise ApiError(503, "the server is shutting down")
        if explain and not engine.can_explain:
            kind = getattr(engine.model, "architecture", type(engine.model).__name__)
            raise ApiError(501, "attention rollout needs the PyTorch model of a ViT; this server runs "
                                f"{engine.backend} {kind}")
        uploads, options = await _read_request(request, settings)
        top_k = _int_option(options, "top_k", settings.default_top_k, 1)
        labels = head = None
        if engine.prompts is not None:  # the classes this request names: their text embeddings (cached)
            labels, templates = _zero_shot_request(options, engine, settings)
            try:
                head = await anyio.to_thread.run_sync(engine.prompts, labels, templates)
            except VitlabError as exc:
                raise ApiError(400, str(exc)) from None
        elif "labels" in options or "template" in options:
            raise ApiError(400, "this server answers with its model's own classes; labels named per request need "
                                "an image-text model served with --zero-shot")
        key = ("explain", *_explain_options(options)) if explain else ("classify",)
        try:
            service.batcher.check_room(len(uploads))  # refuse before spending time on decoding
        except QueueFull as exc:
            raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from None

        # the pixels the headers declare, summed before anything is decoded: a few small compressed uploads can
        # promise gigabytes of pixels; then each image takes a decode slot of its own, so that one request never
        # holds more than one slot while it decodes
        limiter = service.decode_limiter()
        declared = await anyio.to_thread.run_sync(lambda: sum(engine.pixels(data) for _, data in uploads),
                                                  limiter=limiter)
        if declared > settings.max_request_pixels:
            raise ApiError(400, f"the images of this request declare {declared:,} pixels in all; the limit per "
                                f"request is {settings.max_request_pixels:,}")
        decoded = []
        try:
            # a bad file is named as the client named it (the page sends one file per request: all were "image 0")
            for i, (name, data) in enumerate(uploads):
                decoded.append(await anyio.to_thread.run_sync(engine.prepare, data, name or f"image {i}",
                                                              settings.max_pixels, limiter=limiter))
        except VitlabError as exc:
            raise ApiError(400, str(exc)) from None
        images = torch.stack(decoded)
        try:
            outputs = await service.batcher.submit(key, images)
        except QueueFull as exc:
            raise ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from None
        results = []
        for (display, _), out in zip(uploads, outputs):
            probs, rollout = out if explain else (out, None)
            if head is not None:  # a unit image embedding, scored against this request's labels
                probs = engine.prompt_probabilities(probs[None], head)[0]
            entry = {"name": display, "top": engine.top(probs, top_k, labels)}
            if rollout is not None:
                entry["rollout"] = {"grid": list(rollout.values.shape), "values": rollout.values.tolist(),
                                    "source": rollout.source, "head_fusion": rollout.head_fusion,
                                    "discard_ratio": rollout.discard_ratio}
            results.append(entry)
        if explain:
            pngs = await run_in_threadpool(lambda: [engine.overlay_png(x, out[1].values)
                                                    for x, out in zip(images, outputs)])
            for entry, png in zip(results, pngs):
                entry["rollout"]["overlay_png"] = base64.b64encode(png).decode("ascii")
        service.metrics.images.labels("/v1/explain" if explain else "/v1/classify").inc(len(results))
        answer = {"model": engine.name, "results": results, "time_ms": round(1000 * (time.perf_counter() - start), 3)}
        listed = len(results[0]["top"]) if results else top_k
        answer["top_k"] = listed
        if listed < top_k:
            answer["note"] = f"top_k {top_k} is more than the model's {listed} classes: all {listed} are listed"
        return JSONResponse(answer)

    @app.post("/v1/classify", summary="top-k classes of one or several images")
    async def classify(request: Request):
        return await answer(request, explain=False)

    @app.post("/v1/explain", summary="top-k classes and the attention rollout of one or several images")
    async def explain(request: Request):
        return await answer(request, explain=True)

    @app.get("/v1/model", summary="the model card")
    async def model_card():
        return JSONResponse({**engine.card(), "limits": settings.public(), "vitlab_version": __version__})

    @app.get("/healthz", summary="200 while serving, 503 while shutting down")
    async def healthz():
        if service.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.name, "queue": service.batcher.waiting})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        body, kind = service.metrics.exposition()
        return Response(body, media_type=kind)

    def page_route(path: str):
        body, kind = page[path]

        async def serve_page():
            return Response(body, media_type=kind, headers=PAGE_HEADERS)

        return serve_page

    for path in PAGE_FILES:
        app.add_api_route(path, page_route(path), methods=["GET"], include_in_schema=False)

    app.add_middleware(_Guard, service=service)
    return app
