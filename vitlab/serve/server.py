"""Running an app with uvicorn: in the foreground until a signal (``vitlab serve``), or in a background thread.

Graceful shutdown is uvicorn's: on SIGINT / SIGTERM it stops accepting connections, lets every request in progress
finish (up to ``graceful_timeout`` seconds), then runs the app's shutdown, which drains the batching queue.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable

from ..errors import VitlabError
from .metrics import endpoint_label


def bind_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free port; read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VitlabError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc
    sock.set_inheritable(True)
    return sock


HEADER_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5.0


def _config(app, sock: socket.socket, access_log: bool, graceful_timeout: float | None, log_level: str,
            max_connections: int | None = None, header_timeout: float = HEADER_TIMEOUT):
    import uvicorn

    host, port = sock.getsockname()[:2]
    # the body limit and deadline are the app's; uvicorn caps header sizes itself; the protocol adds the header
    # deadline and the request limit (uvicorn's own limit_concurrency counts idle connections too, so that a few
    # clients trickling headers would lock everyone out, and its 503 has no Retry-After and bypasses the metrics)
    return uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=graceful_timeout, server_header=False,
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                          http=_protocol(app, max_connections, header_timeout))


def _json_answer(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode() + body


def _protocol(app, max_connections: int | None, header_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request's headers (a connection that has not sent a whole
    request line and headers ``header_timeout`` seconds after it opened, or after its last answer, gets 408 and is
    closed), a limit of ``max_connections`` requests handled at once (beyond it 503 with ``Retry-After``; connections
    still sending headers do not count, they have the deadline), and every answer of its own (400 for a malformed
    request, 408, 503) counted in the app's metrics."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    service = getattr(getattr(app, "state", None), "vitlab", None)

    def count(endpoint: str, status: int) -> None:
        if service is not None:
            service.metrics.observe_request(endpoint, status, 0.0)

    async def busy(scope, receive, send):
        count(endpoint_label(scope.get("path", "")), 503)
        body = json.dumps({"error": f"the server is handling {max_connections} requests, its limit "
                                    "(--max-connections); retry shortly"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._served_app, self._deadline = self.app, None
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is being answered: the app's body deadline covers it
            count("other", 408)
            self.transport.write(_json_answer(408, "Request Timeout", f"no complete request within "
                                                                      f"{header_timeout:g} s"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if max_connections is not None:
                self.app = busy if len(self.tasks) >= max_connections else self._served_app
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle and self._deadline is not None:  # a whole request arrived
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            count("other", 400)
            super().send_400_response(msg)

    return Protocol


def run_server(app, sock: socket.socket, *, access_log: bool = False, graceful_timeout: float | None = 30.0,
               log_level: str = "info", max_connections: int | None = None,
               header_timeout: float = HEADER_TIMEOUT, on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``app`` on the bound socket until SIGINT / SIGTERM. ``max_connections``: requests handled at once;
    beyond it 503 with ``Retry-After`` (default: no limit). ``header_timeout``: seconds a connection has to send a
    request's line and headers (then 408 and closed); idle keep-alive connections close after 5 s. ``on_ready`` is
    called once the socket accepts connections and the app has started (where ``vitlab serve`` prints its address)."""
    import uvicorn

    server = uvicorn.Server(_config(app, sock, access_log, graceful_timeout, log_level, max_connections,
                                    header_timeout))
    if on_ready is not None:
        # uvicorn listens on the socket and runs the app's startup in ``startup``; announcing before it returns sent
        # scripts that wait for the address to a refused connection (uvicorn has no ready hook, so wrap it)
        startup = server.startup

        async def startup_then_announce(sockets=None):
            await startup(sockets=sockets)
            if server.started and not server.should_exit:
                on_ready()

        server.startup = startup_then_announce
    # uvicorn handles SIGINT / SIGTERM itself (graceful shutdown), then raises the signal again against the handlers
    # it found; handlers that only note the signal make that a normal return, so the caller ends with status 0
    noted: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda number, frame: noted.append(number))
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise VitlabError("the server did not start (see the log above)")


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread on ``host`` (a free port unless given): ``url``, ``stop()``;
    a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
                 log_level: str = "warning", start_timeout: float = 120.0, max_connections: int | None = None,
                 header_timeout: float = HEADER_TIMEOUT):
        import uvicorn

        self.socket = bind_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, self.socket, access_log, 30.0, log_level, max_connections,
                                             header_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="vitlab-serve", daemon=True)
        self.thread.start()
        waited = threading.Event()
        while not self.server.started:
            if not self.thread.is_alive():
                raise VitlabError("the server stopped while starting (see the log)")
            if waited.wait(0.02) or start_timeout <= 0:
                break
            start_timeout -= 0.02
        if not self.server.started:
            self.stop()
            raise VitlabError("the server did not start in time")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully (requests in progress are answered) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
