"""``captioner serve``: a web page and JSON API that caption uploaded pictures with one model.

The model is loaded once, before the port is bound (a bad checkpoint is a one-line error and
nothing listens). Requests that arrive together are captioned together, as one batch.

Slow and numerous clients are bounded by ``--header-timeout-s``, ``--body-timeout-s`` (408) and
``--max-connections`` (503); see :mod:`captioner.serve.server` and :mod:`captioner.serve.middleware`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

from captioner.errors import CaptionerError, ConfigError

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner

PREFIX = "captioner serve"
#: import name -> pip name of what serving needs beyond the core package.
SERVING_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import add_runtime_arguments, path_name
    from captioner.limits import DEFAULT_BEAM_SIZE

    parser = subparsers.add_parser(
        "serve",
        help="serve a web page and JSON API that caption uploaded images",
        description=(
            "Serve a model over HTTP: a page where you drop an image and see its caption, the n-best list\n"
            "and where the model looked for each word, and a JSON API. The model is loaded once; requests\n"
            "arriving within --batch-wait-ms of each other (up to --max-batch) are captioned as one batch."
        ),
        epilog=(
            "examples:\n"
            "  captioner serve runs/shapes/best\n"
            "  captioner serve default --host 0.0.0.0 --port 8080 --beam 3\n"
            "\n"
            "API:\n"
            "  GET  /healthz       status, model (decoder, vocab_size, encoder), limits, batching counters\n"
            "  POST /api/caption   multipart field 'image' (or the raw body with an image/* type);\n"
            "                      optional beam_size, n_best (query or form). Answers JSON: caption, words,\n"
            "                      score, log_prob, n_best, width, height, attention (per word h x w) ...\n"
            "  curl -F image=@photo.jpg 'http://127.0.0.1:8000/api/caption?n_best=3'\n"
            "Errors are JSON {\"error\": \"...\"}: 400 malformed, 408 too slow, 413 too large, 415 not an image,\n"
            "422 bad image or parameter, 503 busy (too many connections or queued requests).\n"
            "\n"
            "slow and numerous clients:\n"
            "  a request's headers must arrive within --header-timeout-s (default 10) of the connection\n"
            "  opening or of the previous answer, and its body within --body-timeout-s (default 30) of\n"
            "  its headers; otherwise it is answered 408 and the connection closed (a connection that\n"
            "  sends nothing is just closed). At most --max-connections (default 64) connections are\n"
            "  served at once, idle ones included; a request on one more is answered 503 (Retry-After: 1).\n"
            "  Between requests, an idle connection is closed after 5 s.\n"
            "\n"
            "large images and other hosts:\n"
            "  an image that decodes to more than --max-image-pixels (default 16,777,216 = 4096 x 4096; a\n"
            "  JPEG counts at its reduced decoding size) is answered 422, and at most --decode-workers\n"
            "  (default 2) uploads are decoded at once: about 15 bytes per pixel each at the peak.\n"
            "  Requests by IP address or to localhost are served; a request naming another host (a web\n"
            "  page reaching this server through DNS rebinding) is answered 403 unless that host is\n"
            "  given with --allowed-host NAME (repeatable; '*' serves any)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=path_name, metavar="MODEL", help="checkpoint folder, or 'default' for the shipped model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE, metavar="K", help=f"default beam size of requests (default {DEFAULT_BEAM_SIZE}, as everywhere)")
    parser.add_argument("--n-best", type=int, default=3, metavar="N", help="default number of captions listed (default 3)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="most images captioned together (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS", help="how long a request waits for others to batch with (default 20; 0 adds no wait, and batches still form while the model is busy)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB", help="largest upload accepted, in MB (default 10)")
    parser.add_argument("--body-timeout-s", type=float, default=30.0, metavar="S", help="time a request's whole body may take to arrive, from its headers (default 30; 408 after it; raise it for large uploads over slow links)")
    parser.add_argument("--header-timeout-s", type=float, default=10.0, metavar="S", help="time a request's headers may take to arrive (default 10; 408 after it)")
    parser.add_argument("--max-connections", type=int, default=64, metavar="N", help="connections served at once, idle ones included (default 64; 503 beyond it)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N", help="largest image decoded, in pixels (default 16777216; 422 beyond it)")
    parser.add_argument("--decode-workers", type=int, default=2, metavar="N", help="uploads decoded at once (default 2)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="a host name to serve besides IP addresses and localhost (repeatable; '*' serves any)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    add_runtime_arguments(parser)
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"), help="server log level (default warning)"
    )
    parser.set_defaults(run=run)


def require_serving_packages() -> None:
    missing = [pip_name for module, pip_name in SERVING_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CaptionerError(f"serving needs {', '.join(missing)}; install with: pip install {' '.join(SERVING_PACKAGES.values())}")


def warm_up(model: Captioner, beam_size: int, n_best: int) -> None:
    """Caption one blank image, so the first request is not slow (and a broken model fails now)."""
    from PIL import Image

    size = model.preprocessing.image_size
    model.caption(Image.new("RGB", (size, size), (128, 128, 128)), beam_size=beam_size, n_best=n_best)


#: ServeConfig's fields as this command's flags.
FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in ("n_best", "max_batch", "batch_wait_ms", "max_upload_mb", "body_timeout_s", "header_timeout_s", "max_connections", "max_image_pixels", "decode_workers")
}
FLAGS.update(beam_size="--beam", allowed_hosts="--allowed-host")


def run(args: argparse.Namespace) -> int:
    from captioner.ranges import SettingError
    from captioner.serve.config import ServeConfig

    try:
        config = ServeConfig(
            beam_size=args.beam,
            n_best=args.n_best,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_upload_mb=args.max_upload_mb,
            body_timeout_s=args.body_timeout_s,
            header_timeout_s=args.header_timeout_s,
            max_connections=args.max_connections,
            max_image_pixels=args.max_image_pixels,
            decode_workers=args.decode_workers,
            allowed_hosts=tuple(args.allowed_host),
        )
    except SettingError as error:
        raise error.named(FLAGS) from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, not {args.port}")
    require_serving_packages()

    from captioner.device import resolve_device
    from captioner.models.captioner import Captioner
    from captioner.serve.app import create_app, model_info
    from captioner.serve.server import AnnouncingServer, bind_socket, check_port_free, socket_url, uvicorn_config

    check_port_free(args.host, args.port)  # a taken port is reported before the (slow) model load
    model = Captioner.load(args.model, device=resolve_device(args.device), decoder_compute=args.decoder_compute, encoder_runtime=args.encoder_runtime)
    warm_up(model, config.beam_size, config.n_best)
    sock = bind_socket(args.host, args.port)
    url = socket_url(sock)
    info = model_info(model, str(args.model))
    app = create_app(model, config, model_name=str(args.model))

    def announce() -> None:
        print(f"{PREFIX}: {args.model} ({info['decoder_name']}, {info['vocab_size']} words) ready at {url}", flush=True)
        if args.host in ("0.0.0.0", "::", ""):
            local = url.replace("[::]", "[::1]").replace("0.0.0.0", "127.0.0.1")
            print(f"{PREFIX}: listening on every interface; on this machine open {local}", flush=True)
        print(f"{PREFIX}: press Ctrl+C to stop", flush=True)

    log_level = "info" if args.access_log and args.log_level in ("critical", "error", "warning") else args.log_level
    if log_level != "debug":  # a malformed upload is the client's error, answered with a 400 JSON: not a server warning
        logging.getLogger("python_multipart").setLevel(logging.ERROR)
    server = AnnouncingServer(uvicorn_config(app, serve_config=config, log_level=log_level, access_log=args.access_log), on_started=announce)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        raise CaptionerError(f"the server at {url} did not start (see the messages above)")
    print(f"{PREFIX}: stopped", file=sys.stderr, flush=True)
    return 0
