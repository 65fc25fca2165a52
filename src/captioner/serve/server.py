"""Running the app: binding the port ourselves (clear errors, port 0), uvicorn, and a background server.

:func:`bind_socket` opens the listening socket before uvicorn starts, so "address already in use"
becomes a one-line :class:`~captioner.errors.CaptionerError` and ``--port 0`` picks a free port
whose URL can be printed. :class:`BackgroundServer` runs an app on a thread (tests, notebooks).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any, Callable

import uvicorn

from captioner.errors import CaptionerError

#: uvicorn's HTTP implementation is pinned: the body limit's behaviour (close after an early 413)
#: is tested with h11, and h11 is always installed with uvicorn.
HTTP_PROTOCOL = "h11"


def check_port_free(host: str, port: int) -> None:
    """Fail now, with :func:`bind_socket`'s one-line error, if ``host``:``port`` cannot be bound.

    Binds without listening and lets go at once: a cheap check before a slow model load.
    """
    bind_socket(host, port, listen=False).close()


def bind_socket(host: str, port: int, *, backlog: int = 2048, listen: bool = True) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise CaptionerError(f"cannot listen on {host}:{port}: unknown host ({error.strerror})") from None
    last_error: OSError | None = None
    for family, kind, protocol, _, address in infos:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if listen:
                sock.listen(backlog)
            sock.setblocking(False)
            return sock
        except OSError as error:
            sock.close()
            last_error = error
    reason = last_error.strerror if last_error is not None and last_error.strerror else str(last_error)
    hint = "; pick another --port (0 picks a free one)" if last_error is not None and last_error.errno == errno.EADDRINUSE else ""
    raise CaptionerError(f"cannot listen on {host}:{port}: {reason}{hint}")


def socket_url(sock: socket.socket) -> str:
    """``http://HOST:PORT/`` for a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def uvicorn_config(app: Any, *, log_level: str = "warning", access_log: bool = False, configure_logging: bool = True) -> uvicorn.Config:
    options: dict[str, Any] = {}
    if not configure_logging:
        options["log_config"] = None  # leave the process's logging alone (tests, notebooks)
    return uvicorn.Config(
        app,
        http=HTTP_PROTOCOL,
        ws="none",
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
        **options,
    )


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls ``on_started`` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()


class BackgroundServer:
    """Serve an ASGI app from a thread; ``url`` is its address once entered.

    >>> with BackgroundServer(app) as server:          # doctest: +SKIP
    ...     httpx.get(server.url + "healthz").json()
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 30.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "BackgroundServer":
        sock = bind_socket(self.host, self.port)
        self.url = socket_url(sock)
        server = uvicorn.Server(uvicorn_config(self.app, configure_logging=False))
        self._server = server

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as error:  # SystemExit from a failed lifespan startup, too
                self._error = error

        self._thread = threading.Thread(target=serve, name="captioner-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._server = None
        self._thread = None
