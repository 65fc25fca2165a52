"""Running the app: binding the port ourselves (clear errors, port 0), uvicorn, and a background server.

:func:`bind_socket` opens the listening socket before uvicorn starts, so "address already in use"
becomes a one-line :class:`~captioner.errors.CaptionerError` and ``--port 0`` picks a free port
whose URL can be printed. :class:`BackgroundServer` runs an app on a thread (tests, notebooks).

Slow and numerous clients. uvicorn's h11 protocol has one timeout of its own, ``timeout_keep_alive``
(5 s), and it only runs between requests, after an answer: a connection that sends nothing, or part
of its headers and then nothing (or one byte now and then), is otherwise held open for ever.
:class:`GuardedH11Protocol` adds what is missing, from :class:`~captioner.serve.config.ServeConfig`:

* ``header_timeout_s``: a request's headers must be complete that long after the connection opened
  (or after the previous answer on it). When the deadline passes with part of a request received,
  the client gets 408 ``{"error": ...}`` and the connection is closed; with nothing received (an idle
  connection) it is just closed, like an idle keep-alive connection. The same deadline closes a
  connection whose client goes on sending the body of a request that was already answered.
* ``max_connections``: up to that many connections are served at once, idle and slow ones included
  (uvicorn's ``limit_concurrency``, done here so the answer is JSON): a request arriving on one more
  is answered 503 ``{"error": ...}`` with ``Retry-After: 1`` and its connection is closed. Connections
  are still accepted beyond the limit (the 503 is the answer), and the header deadline closes the
  ones that never send a request.
* Requests h11 cannot parse (garbage, or headers still unfinished after 16 kB) get a 400
  ``{"error": ...}`` and the connection is closed, where uvicorn would answer in plain text.

The body's own deadline, ``body_timeout_s``, is kept by :class:`~captioner.serve.middleware.BodySizeLimit`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import socket
import threading
import time
from typing import Any, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from captioner.errors import CaptionerError
from captioner.serve.config import ServeConfig
from captioner.serve.middleware import send_json_error

#: uvicorn's HTTP implementation is pinned: the body limit's behaviour (close after an early 413)
#: is tested with h11, and h11 is always installed with uvicorn. :class:`GuardedH11Protocol` extends it.
HTTP_PROTOCOL = "h11"

logger = logging.getLogger(__name__)


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


def json_error_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response ``{"error": message}`` that closes the connection, as bytes."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection limit and JSON protocol errors.

    See the module docstring. One instance serves one connection; ``self.connections`` and
    ``self.tasks`` are the server's sets of open connections and running requests.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._served_app = self.app
        self._header_timer: asyncio.TimerHandle | None = None

    # ----- the connection limit ----------------------------------------------------------------
    def _over_limit(self) -> bool:
        # ``connections`` includes this one; a request whose client left may still be running.
        limit = self.max_connections
        return limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit)

    async def _refuse_busy(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"the server is at its limit of {self.max_connections} open connections; try again shortly"
        logger.warning("refused a request: %d connections are open, the limit is %s", len(self.connections), self.max_connections)
        await send_json_error(send, 503, message, close=True, headers={"Retry-After": "1"})

    def handle_events(self) -> None:
        # uvicorn starts each request it parses here with ``self.app``: the app, or the 503 answer.
        self.app = self._refuse_busy if self._over_limit() else self._served_app
        super().handle_events()
        if self._request_in_progress():
            self._cancel_header_timer()

    # ----- the header deadline -----------------------------------------------------------------
    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if self.header_timeout_s is not None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._request_in_progress():
            return
        received, _ = self.conn.trailing_data
        if self.conn.their_state is h11.IDLE and received:  # part of a request: tell the client why
            message = f"the request took too long: its headers must arrive within {self.header_timeout_s:g} s"
            self.transport.write(json_error_bytes(408, "Request Timeout", message))
        self.transport.close()  # idle, or still sending the body of a request already answered

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms the keep-alive timer, starts a pipelined request
        if not self.transport.is_closing() and not self._request_in_progress():
            self._arm_header_timer()

    # ----- protocol errors ---------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "invalid HTTP request"}).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # too late in the exchange for an answer
            pass
        self.transport.close()


def uvicorn_config(
    app: Any,
    *,
    serve_config: ServeConfig | None = None,
    log_level: str = "warning",
    access_log: bool = False,
    configure_logging: bool = True,
) -> uvicorn.Config:
    """uvicorn's settings for ``app``; the connection limits come from ``serve_config`` (by default the
    app's own ``app.state.config``, as :func:`~captioner.serve.app.create_app` sets it)."""
    if serve_config is None:
        found = getattr(getattr(app, "state", None), "config", None)
        serve_config = found if isinstance(found, ServeConfig) else ServeConfig()
    options: dict[str, Any] = {}
    if not configure_logging:
        options["log_config"] = None  # leave the process's logging alone (tests, notebooks)
    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=serve_config.header_timeout_s, max_connections=serve_config.max_connections)
    return uvicorn.Config(
        app,
        http=protocol,  # type: ignore[arg-type]
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

    >>> from captioner.serve import create_app
    >>> with BackgroundServer(create_app(Captioner.load("default"))) as server:
    ...     httpx.get(server.url + "healthz").json()["model"]["vocab_size"]
    2538
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
        self._sock: socket.socket | None = None

    def __enter__(self) -> "BackgroundServer":
        sock = self._sock = bind_socket(self.host, self.port)
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
        if self._sock is not None:
            self._sock.close()  # uvicorn closes it when it ran; not when it failed before taking it over
        self._server = None
        self._thread = None
        self._sock = None
