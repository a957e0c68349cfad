"""``vitlab serve CHECKPOINT``: the model behind an HTTP API (classify, explain, model card, metrics) and a web page."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..errors import VitlabError
from ._merging import ALIASES, add_merge_tokens_argument
from ._zeroshot import ALIASES as ZERO_SHOT_ALIASES
from ._zeroshot import add_class_arguments, add_template_arguments, class_names_of, templates_of

API_KEY_ENV = "VITLAB_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (API + web page) with dynamic batching",
        description="Serve a checkpoint (any file or name vitlab.load reads, or an .onnx file) over HTTP: POST "
                    "/v1/classify and /v1/explain (top-k classes, attention rollout), GET /v1/model, /healthz, "
                    "/metrics (Prometheus) and a web page at /. Requests arriving within --max-wait-ms run as one "
                    "batch of up to --max-batch images; when --max-queue images wait, new requests get 503 with "
                    "Retry-After. SIGINT / SIGTERM stop it after answering the requests already accepted. "
                    f"An API key is read from ${API_KEY_ENV} or --api-key-file.")
    p.add_argument("checkpoint", help="checkpoint file or name, an .onnx file (with --backend onnx-int8) or a .pt2 "
                                      "package (with --backend pt2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (torch backend; pt2 compiling a checkpoint)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx-int8", "pt2"],
                   help="torch, ONNX Runtime's int8 model (CPU; a checkpoint is exported and quantised at start), or "
                        "a .pt2 package on AOTInductor (a checkpoint is compiled at start: tens of seconds)")
    p.add_argument("--max-batch", type=int, default=16, help="most images per model call (default 16; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first image of a batch waits for others (default 5 ms)")
    p.add_argument("--max-queue", type=int, default=128, help="most images waiting; beyond it 503 (default 128)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit in MiB (default 16)")
    p.add_argument("--max-images", type=int, default=16, help="most images per request (default 16)")
    p.add_argument("--max-pixels", type=int, default=25_000_000,
                   help="largest image accepted, in pixels, checked before decoding (default 25,000,000)")
    p.add_argument("--max-request-pixels", type=int, default=50_000_000,
                   help="most pixels the images of one request may declare in all, checked before decoding "
                        "(default 50,000,000)")
    p.add_argument("--max-connections", type=int,
                   help="requests handled at once; beyond it 503 with Retry-After (default: no limit)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers; then 408 (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request has to send its body after its headers; then 408 (default 30)")
    p.add_argument("--api-key-file", type=Path, help=f"file holding the API key (else ${API_KEY_ENV}, else none)")
    p.add_argument("--threads", type=int, help="intra-op threads of torch / ONNX Runtime (default: torch's)")
    p.add_argument("--name", help="model name shown in answers and on the model card (default: the file's stem)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs time)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to wait for requests in progress at shutdown (default 30)")
    add_merge_tokens_argument(p)
    add_class_arguments(p, "zero-shot: CHECKPOINT is an image-text model (CLIP, SigLIP) served as the classifier of "
                           "these classes (with --zero-shot: the classes of requests that name none; "
                           "docs/zero-shot.md); ")
    p.add_argument("--zero-shot", action="store_true",
                   help="CHECKPOINT is an image-text model (CLIP, SigLIP) and each request names its own classes "
                        "('labels', optionally 'template'); text embeddings are cached per label list (torch "
                        "backend)")
    add_template_arguments(p)
    p.add_argument("--max-prompts", type=int, default=256,
                   help="--zero-shot: most labels x templates one request may name; each new list costs a text-tower "
                        "pass (default 256)")
    p.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise VitlabError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError:  # another file given in its place (a key is text sent in a header)
            raise VitlabError(f"--api-key-file {args.api_key_file}: not a text file") from None
        if not key:
            raise VitlabError(f"--api-key-file {args.api_key_file} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _prompt_engine(args: argparse.Namespace, classes: list[str] | None, name: str):
    """The engine of ``--zero-shot``: the image tower's unit embeddings, scored per request against the text
    embeddings of the labels it names (``classes``: the labels of requests that name none)."""
    import torch

    from .. import load_image_text
    from ..serve.engine import Engine
    from ..zeroshot import PromptHeads, image_embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    image_text = load_image_text(args.checkpoint).to(args.device).eval()
    prompts = PromptHeads(image_text, templates_of(args))
    if classes is not None:
        prompts(classes)  # a bad name or template is refused now, not at the first request
    return Engine(image_embedder(image_text), device=args.device, name=name, source=args.checkpoint,
                  prompts=prompts, class_names=classes)


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve import ServeSettings, bind_socket, create_app, run_server
    except ImportError as exc:
        raise VitlabError(f"vitlab serve needs the 'serve' extra (pip install 'vitlab[serve]'): {exc}") from exc
    if not 0 <= args.port <= 65535:
        raise VitlabError(f"--port must be in 0..65535, got {args.port}")
    if args.max_connections is not None and args.max_connections < 1:
        raise VitlabError(f"--max-connections must be at least 1, got {args.max_connections}")
    if not args.header_timeout > 0:
        raise VitlabError(f"--header-timeout must be positive, got {args.header_timeout}")
    if args.max_body_mb <= 0:
        raise VitlabError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise VitlabError(f"--device {args.device}: CUDA is not available on this machine")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                             max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                             api_key=_api_key(args), body_timeout_s=args.body_timeout, max_prompts=args.max_prompts)
    model, name = args.checkpoint, args.name
    classes = class_names_of(args, required=False)
    if (args.template or args.prompt_ensemble) and classes is None and not args.zero_shot:
        raise VitlabError("--template / --prompt-ensemble choose the prompts of zero-shot classes; give --classes or "
                          "--classes-file")
    for flag, on in (("--merge-tokens", args.merge_tokens), ("--zero-shot", args.zero_shot)):
        if on and args.backend != "torch":
            raise VitlabError(f"{flag} runs on the torch backend; drop --backend {args.backend}")
    if args.merge_tokens or classes is not None or args.zero_shot:  # built here and served as an engine
        from ..compute.tome import merge_tokens
        from ..serve.engine import load_engine
        from .train import flags_in_errors

        with flags_in_errors({**ALIASES, **ZERO_SHOT_ALIASES}, config_flags=False):
            source, shown = args.checkpoint, name or Path(args.checkpoint.rstrip("/")).stem
            if args.zero_shot:
                model = _prompt_engine(args, classes, shown)
            else:
                if classes is not None:
                    from .. import load_image_text
                    from ..zeroshot import zero_shot_classifier

                    source = zero_shot_classifier(load_image_text(args.checkpoint), classes, templates_of(args))
                model = load_engine(source, backend=args.backend, device=args.device, threads=args.threads,
                                    name=shown)
                model.source = args.checkpoint  # the card names the image-text model a classifier came from
            if args.merge_tokens:
                merge_tokens(model.model, args.merge_tokens)
    app = create_app(model, backend=args.backend, device=args.device, name=name, threads=args.threads,
                     settings=settings)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    engine = app.state.vitlab.engine
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and settings.api_key is None:
        print(f"vitlab serve: warning: listening on {host}, reachable from other machines, without an API key "
              f"(set ${API_KEY_ENV} or --api-key-file)", file=sys.stderr, flush=True)

    def announce() -> None:  # once the socket accepts: a script may connect as soon as it reads this line
        print(f"vitlab serve: {engine.name} ({engine.backend} on {engine.device}) at http://{shown}:{port}/ "
              f"({'API key required' if settings.api_key else 'no API key'}; batches of {settings.max_batch} "
              f"within {settings.max_wait_ms:g} ms)", flush=True)

    run_server(app, sock, access_log=args.access_log, graceful_timeout=args.graceful_timeout,
               max_connections=args.max_connections, header_timeout=args.header_timeout, on_ready=announce)
    print("vitlab serve: stopped", flush=True)
    return 0
