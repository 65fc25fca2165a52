"""The web demo's application: the page, ``/healthz`` and ``POST /api/caption``.

``create_app(model, config)`` returns an ASGI app (FastAPI) that serves one loaded
:class:`~captioner.models.captioner.Captioner`. Uploads are decoded in worker threads, then queued
for the :class:`~captioner.serve.batching.DynamicBatcher`, whose single thread runs the model on
batches of requests with equal decoding settings. Every error is a JSON ``{"error": "..."}`` with a
4xx/5xx status; the server never answers with a traceback page.

Slow clients: the request body must arrive within ``ServeConfig.body_timeout_s`` of its headers
(408 and the connection closed otherwise; see :mod:`captioner.serve.middleware`). Slow headers,
idle connections and the number of connections are bounded by the server (:mod:`captioner.serve.server`).

Routes:

``GET /``
    The page (static HTML, JavaScript and CSS from ``captioner/serve/static``; nothing external).
``GET /healthz``
    ``{"status": "ok", "version", "model": {...}, "defaults": {...}, "limits": {...}, "batching": {...}, "uptime_s"}``.
``POST /api/caption``
    The image as multipart field ``image`` (or as the raw body with an ``image/*`` Content-Type);
    optional ``beam_size`` and ``n_best`` as query parameters or form fields. Answers
    ``{"caption", "words", "score", "log_prob", "n_best": [{"caption", "words", "score", "log_prob"}],
    "tags": [{"word", "probability"}] (visual concepts, likeliest first), "constraints": [[word, ...]]
    (what the caption had to name: one word of each list), "constraints_met" (false: no caption it
    could write names them all, so this is its best caption without them; null: nothing was required),
    "familiar" (true: near the model's training photos, so no concept was required; null: not asked),
    "width", "height", "attention": [per word: h x w grid] | null, "attention_shape": [h, w] | null,
    "attention_region": {"left", "top", "right", "bottom"}, "settings": {"beam_size", "n_best"},
    "batch_size", "timing_ms": {"upload", "decode", "queue", "model", "total"}}``.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from captioner import __version__
from captioner.errors import ImageLoadError
from captioner.ranges import SettingError
from captioner.serve.batching import BatcherBusy, BatcherClosed, DynamicBatcher
from captioner.serve.captioning import ModelRunner, PreparedImage, caption_json, prepare_upload
from captioner.serve.config import DecodeSettings, ServeConfig
from captioner.serve.middleware import AllowedHosts, BodySizeLimit, InternalErrorsAsJson, UploadTimedOut, UploadTooLarge

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner, CaptionResult

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The page loads only its own files; uploads are previewed from blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DECODER_NAMES = {"attention": "Show, Attend and Tell", "show_tell": "Show and Tell"}
#: Upload names are echoed in error messages: keep them short and on one line.
MAX_NAME_CHARS = 80


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def create_app(model: "Captioner", config: ServeConfig | None = None, *, model_name: str = "model") -> FastAPI:
    """The web app serving ``model``. Its batcher thread starts and stops with the app's lifespan.

    ``app.state.batcher`` (its ``stats()``) and ``app.state.config`` are there for tests and monitoring.
    """
    config = config or ServeConfig()
    batcher: DynamicBatcher[DecodeSettings, PreparedImage, CaptionResult] = DynamicBatcher(
        ModelRunner(model), max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000.0, max_pending=config.max_pending
    )
    has_attention = model.config.decoder.kind == "attention"
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    started = time.monotonic()
    decoders: list[anyio.CapacityLimiter] = []  # made on the server's event loop, at startup

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Uploads decoded at the same time: a decoded photo can take hundreds of MB (about 15 bytes
        # per pixel at the peak of PNG decoding), so a flood of large uploads is decoded a few at a time.
        decoders[:] = [anyio.CapacityLimiter(config.decode_workers)]
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="captioner", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config
    app.state.model = model
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit_bytes=config.max_body_bytes, described_limit=config.max_upload_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(AllowedHosts, allowed=config.allowed_hosts)
    app.add_middleware(InternalErrorsAsJson)  # added last: the outermost, so it sees every failure
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            index_html,
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> JSONResponse:
        running = batcher.running
        body = {
            "status": "ok" if running else "stopping",
            "version": __version__,
            "model": model_info(model, model_name),
            "defaults": config.default_settings.to_dict(),
            "limits": config.limits(),
            "allowed_hosts": ["IP addresses", "localhost", *config.allowed_hosts],
            "batching": {"max_batch": config.max_batch, "wait_ms": config.batch_wait_ms, **batcher.stats().to_dict()},
            "uptime_s": round(time.monotonic() - started, 3),
        }
        return JSONResponse(body, status_code=200 if running else 503)

    @app.post("/api/caption")
    async def caption(request: Request) -> JSONResponse:
        begin = time.perf_counter()
        data, name, fields = await read_upload(request, config)
        settings = decode_settings(request.query_params, fields, config)
        received = time.perf_counter()
        try:
            prepared = await anyio.to_thread.run_sync(prepare_upload, data, name, model.preprocessing, config.max_image_pixels, limiter=decoders[0])
        except ImageLoadError as error:
            status = 415 if error.reason.startswith("not an image") else 422
            raise ApiError(status, str(error)) from None
        decoded = time.perf_counter()
        try:
            future = batcher.submit(settings, prepared)
        except BatcherBusy as error:
            raise ApiError(503, f"the server is busy ({error}); try again shortly", {"Retry-After": "1"}) from None
        except BatcherClosed as error:
            raise ApiError(503, str(error)) from None
        batched = await asyncio.wrap_future(future)
        body = caption_json(batched.value, prepared, settings, has_attention=has_attention)
        body["batch_size"] = batched.batch_size
        body["timing_ms"] = {
            "upload": round((received - begin) * 1000, 1),
            "decode": round((decoded - received) * 1000, 1),
            "queue": round(batched.queued_s * 1000, 1),
            "model": round(batched.run_s * 1000, 1),
            "total": round((time.perf_counter() - begin) * 1000, 1),
        }
        return JSONResponse(body)

    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce becomes ``{"error": "..."}`` JSON with the right status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(UploadTooLarge)
    async def too_large(request: Request, error: UploadTooLarge) -> Response:
        # The rest of the body is not read: close the connection rather than drain it.
        return error_response(413, str(error), {"Connection": "close"})

    @app.exception_handler(UploadTimedOut)
    async def too_slow(request: Request, error: UploadTimedOut) -> Response:
        # The client is still holding the rest of the body back: do not wait for it.
        return error_response(408, str(error), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, error: ClientDisconnect) -> Response:
        return error_response(400, "the client disconnected before the upload was complete")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            message = f"no such page: {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(error.status_code, message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"invalid request: {where}: {first.get('msg', 'invalid value')}")

    # Anything else (a bug, a failing model) is answered by InternalErrorsAsJson.


# ----- requests -----------------------------------------------------------------------------------


async def read_upload(request: Request, config: ServeConfig) -> tuple[bytes, str, dict[str, str]]:
    """The uploaded file's bytes, its (display) name, and the request's other form fields."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
        try:
            upload = form.get("image")
            if upload is None:
                raise ApiError(422, "missing form field 'image': send the picture as the multipart/form-data field 'image'")
            if isinstance(upload, str):
                raise ApiError(422, "form field 'image' must be a file, not text")
            data = await upload.read()
            name = safe_name(upload.filename or "upload")
            fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        finally:
            await form.close()
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        data, name, fields = await request.body(), "upload", {}
    else:
        shown = media_type or "none"
        raise ApiError(
            415,
            f"unsupported Content-Type {shown}: send the picture as the multipart/form-data field 'image', "
            "or as the raw request body with an image/* Content-Type",
        )
    if len(data) > config.max_upload_bytes:
        raise UploadTooLarge(config.max_upload_bytes)
    return data, name, fields


def decode_settings(query: Mapping[str, str], fields: Mapping[str, str], config: ServeConfig) -> DecodeSettings:
    """``beam_size`` and ``n_best`` from the form or the query string (the server's defaults where absent), checked."""
    beam_size = whole_number("beam_size", fields.get("beam_size", query.get("beam_size")), config.beam_size)
    n_best = whole_number("n_best", fields.get("n_best", query.get("n_best")), config.n_best)
    try:
        return DecodeSettings(beam_size, n_best)
    except SettingError as error:
        raise ApiError(422, str(error)) from None


def whole_number(name: str, raw: str | None, default: int) -> int:
    if raw is None or raw.strip() == "":
        return default
    if not re.fullmatch(r"\d{1,9}", raw.strip(), re.ASCII):  # int() would also take "1_0" and "٣"
        raise ApiError(422, f"{name} must be a whole number, not {one_line(raw)[:20]!r}")
    return int(raw.strip())


def safe_name(name: str) -> str:
    """An upload's file name as it may appear in a one-line message."""
    cleaned = one_line(name).strip() or "upload"
    return cleaned if len(cleaned) <= MAX_NAME_CHARS else cleaned[: MAX_NAME_CHARS - 3] + "..."


def one_line(text: str) -> str:
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


# ----- model description --------------------------------------------------------------------------


def model_info(model: "Captioner", name: str) -> dict[str, Any]:
    """What /healthz (and the page) say about the served model."""
    config = model.config
    return {
        "name": name,
        "decoder": config.decoder.kind,
        "decoder_name": DECODER_NAMES.get(config.decoder.kind, config.decoder.kind),
        "attention": config.decoder.kind == "attention",
        "vocab_size": len(model.vocab),
        "encoder": config.encoder.backbone,
        "feature_layer": config.encoder.feature_layer,
        "image_size": model.preprocessing.image_size,
        "resize": model.preprocessing.resize,
        "max_length": config.max_length,
        **config.decoding_defaults(),  # the model's own: length_penalty, no_repeat_ngram_size
        "decoders": len(config.ensemble.decoders) if config.ensemble else 1,  # an ensemble's, averaged
        "views": list(model.views),  # "flip": each image is also read mirrored
        "device": str(model.device),
        "decoder_compute": model.decoder_compute,  # "int8": decoding's per-step matrices in int8
        "encoder_runtime": model.encoder_runtime.name if model.encoder_runtime is not None else "torch",
    }
