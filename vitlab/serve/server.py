"""Running an app with uvicorn: in the foreground until a signal (``vitlab serve``), or in a background thread.

Graceful shutdown is uvicorn's: on SIGINT / SIGTERM it stops accepting connections, lets every request in progress
finish (up to ``graceful_timeout`` seconds), then runs the app's shutdown, which drains the batching queue.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable

from ..errors import VitlabError


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


def _config(app, sock: socket.socket, access_log: bool, graceful_timeout: float | None, log_level: str,
            max_connections: int | None = None):
    import uvicorn

    host, port = sock.getsockname()[:2]
    # the body limit is the app's; uvicorn caps header sizes itself, and with ``max_connections`` (its
    # limit_concurrency) answers 503 to connections beyond that many
    return uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=graceful_timeout, server_header=False,
                          limit_concurrency=max_connections)


def run_server(app, sock: socket.socket, *, access_log: bool = False, graceful_timeout: float | None = 30.0,
               log_level: str = "info", max_connections: int | None = None,
               on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``app`` on the bound socket until SIGINT / SIGTERM. ``max_connections``: connections and requests
    handled at once; beyond it uvicorn answers 503 (default: no limit). ``on_ready`` is called once the socket
    accepts connections and the app has started (where ``vitlab serve`` prints its address)."""
    import uvicorn

    server = uvicorn.Server(_config(app, sock, access_log, graceful_timeout, log_level, max_connections))
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
                 log_level: str = "warning", start_timeout: float = 120.0):
        import uvicorn

        self.socket = bind_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, self.socket, access_log, 30.0, log_level))
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
