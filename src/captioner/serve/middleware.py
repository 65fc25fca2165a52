"""ASGI middleware: the request body limit, and internal errors as JSON.

:class:`BodySizeLimit` refuses large uploads without reading them. A declared ``Content-Length`` over the limit is answered with 413 at once, before any of the body
is read, and the connection is closed (so the server does not read the rest either). Bodies without
a length (chunked uploads), or longer than declared, are counted as they are read: the moment the
count passes the limit, :class:`UploadTooLarge` is raised inside the application, which answers 413.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable, MutableMapping

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


def describe_size(size: int) -> str:
    """Bytes for people: '10 MB', '0.2 MB', '5 kB', '900 bytes' (powers of 1000, like ``--max-upload-mb``)."""
    if size >= 100_000:
        return f"{size / 1_000_000:g} MB"
    if size >= 1_000:
        return f"{size / 1_000:g} kB"
    return f"{size} bytes"


async def send_json_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    """Answer with ``{"error": message}`` directly at the ASGI level."""
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Wraps an ASGI app so no request body over ``limit_bytes`` is read.

    ``describe`` is the limit people are told about (the file limit, which is a little smaller than
    the body limit: the multipart framing around the file is allowed for).
    """

    def __init__(self, app: ASGIApp, limit_bytes: int, *, described_limit: int | None = None) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.described_limit = described_limit if described_limit is not None else limit_bytes

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
        limit = self.limit_bytes
        described = self.described_limit

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(described)
            return message

        await self.app(scope, counting_receive, send)


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
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean answer: let the server drop the connection
            detail = " ".join(str(error).split())
            await send_json_error(send, 500, f"internal error: {type(error).__name__}: {detail}" if detail else f"internal error: {type(error).__name__}")
