"""ASGI middleware: the request body limits (size and time), and internal errors as JSON.

:class:`BodySizeLimit` refuses large uploads without reading them. A declared ``Content-Length`` over the limit is answered with 413 at once, before any of the body
is read, and the connection is closed (so the server does not read the rest either). Bodies without
a length (chunked uploads), or longer than declared, are counted as they are read: the moment the
count passes the limit, :class:`UploadTooLarge` is raised inside the application, which answers 413.

It also bounds the time a body may take (slowloris-style uploads that trickle in, or stall half-way):
the whole body must have arrived ``timeout_s`` after the request's headers. Each read of the body
waits only for what is left of that deadline; when it passes, :class:`UploadTimedOut` is raised
inside the application, which answers 408 with ``Connection: close``. Reads after the body is
complete (waiting for a disconnect) are not timed.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Awaitable, Callable, MutableMapping

import anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)


class UploadTooLarge(Exception):
    """The request body is larger than the server accepts."""

    def __init__(self, limit_bytes: int, message: str | None = None) -> None:
        self.limit_bytes = limit_bytes
        super().__init__(message or f"the upload is too large: the limit is {describe_size(limit_bytes)}")


class UploadTimedOut(Exception):
    """The request body did not arrive within the server's body deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"the upload took too long: the whole request must arrive within {timeout_s:g} s")


def describe_size(size: int) -> str:
    """Bytes for people: '10 MB', '0.2 MB', '5 kB', '900 bytes' (powers of 1000, like ``--max-upload-mb``)."""
    if size >= 100_000:
        return f"{size / 1_000_000:g} MB"
    if size >= 1_000:
        return f"{size / 1_000:g} kB"
    return f"{size} bytes"


async def send_json_error(send: Send, status: int, message: str, *, close: bool = False, headers: dict[str, str] | None = None) -> None:
    """Answer with ``{"error": message}`` directly at the ASGI level (``headers``: extra ones)."""
    body = json.dumps({"error": message}).encode("utf-8")
    headers_out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers_out += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    if close:
        headers_out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers_out})
    await send({"type": "http.response.body", "body": body})


class TrackingSend:
    """Wraps ``send``; ``started`` tells whether the response has begun (then it is too late for an error answer)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class BodySizeLimit:
    """Wraps an ASGI app so no request body over ``limit_bytes`` is read, nor read for over ``timeout_s``.

    ``describe`` is the limit people are told about (the file limit, which is a little smaller than
    the body limit: the multipart framing around the file is allowed for). ``timeout_s`` (None: no
    limit) is counted from the moment the request's headers were read to the body's last byte.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int, *, described_limit: int | None = None, timeout_s: float | None = None) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.described_limit = described_limit if described_limit is not None else limit_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await send_json_error(send, 400, "invalid Content-Length header", close=True)
            return
        if declared is not None and declared > self.limit_bytes:
            await send_json_error(send, 413, str(UploadTooLarge(self.described_limit)), close=True)
            return

        received = 0
        complete = False
        limit = self.limit_bytes
        described = self.described_limit
        timeout_s = self.timeout_s
        deadline = anyio.current_time() + timeout_s if timeout_s is not None else math.inf

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete or timeout_s is None:  # complete: what is left to wait for is a disconnect
                message = await receive()
            else:
                try:
                    with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                        message = await receive()
                except TimeoutError:
                    raise UploadTimedOut(timeout_s) from None
            if complete:
                return message
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(described)
                complete = not message.get("more_body", False)
            else:
                complete = True  # http.disconnect: nothing more will come
            return message

        tracking = TrackingSend(send)
        try:
            await self.app(scope, counting_receive, tracking)
        except UploadTimedOut as error:  # the app normally answers it; this is for apps that do not
            if tracking.started:
                raise
            await send_json_error(send, 408, str(error), close=True)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when not given, -1 when malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


class InternalErrorsAsJson:
    """Turns an exception that escaped the app (a bug, a model failure) into a 500 ``{"error": ...}``.

    Unlike Starlette's own last-resort handler it does not re-raise, so the server keeps the
    connection open for the client's next request; the traceback goes to the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracking = TrackingSend(send)
        try:
            await self.app(scope, receive, tracking)
        except Exception as error:
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if tracking.started:
                raise  # too late for a clean answer: let the server drop the connection
            detail = " ".join(str(error).split())
            await send_json_error(send, 500, f"internal error: {type(error).__name__}: {detail}" if detail else f"internal error: {type(error).__name__}")


def host_of(header: str) -> str:
    """The host name of a Host header, lower-cased, without its port ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_ip_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowedHosts:
    """Answers 403 to a request whose Host header names a host the server was not told it is.

    A web page can reach a server on this machine through DNS rebinding (a name it controls that
    suddenly resolves to 127.0.0.1): the browser then sends that name as the Host. Requests by IP
    address and to ``localhost`` are always served (a rebinding attack needs a name); other names
    only when listed (``--allowed-host NAME``; ``*`` serves any).
    """

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {name.lower() for name in allowed}

    def allows(self, host: str) -> bool:
        return "*" in self.allowed or host in self.allowed or host == "localhost" or host.endswith(".localhost") or is_ip_address(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"host"), None)
            if header is not None and not self.allows(host_of(header)):
                shown = "".join(ch if ch.isprintable() else "?" for ch in host_of(header))[:80]
                message = f"host {shown!r} is not served here (DNS rebinding protection); start the server with --allowed-host {shown} to serve it"
                await send_json_error(send, 403, message, close=True)
                return
        await self.app(scope, receive, send)
