"""The server under slow, numerous and bad clients, on 127.0.0.1: raw sockets for the slow ones, httpx for the rest.

Deadlines are short here (ServeConfig): a body must arrive within BODY_TIMEOUT_S of its headers,
headers within HEADER_TIMEOUT_S of the connection opening (or of the previous answer).
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import make_model

pytest.importorskip("fastapi")

BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 1.5
UPLOAD_LIMIT_MB = 0.2
#: How late past a deadline an answer may come on a busy machine.
SLACK_S = 3.0


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_model(pretrained=True).save(tmp_path_factory.mktemp("serve_load") / "ckpt")


def start_server(checkpoint: Path, **settings):
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    config = ServeConfig(batch_wait_ms=5, max_upload_mb=UPLOAD_LIMIT_MB, body_timeout_s=BODY_TIMEOUT_S, header_timeout_s=HEADER_TIMEOUT_S, **settings)
    return BackgroundServer(create_app(Captioner.load(checkpoint), config))


@pytest.fixture(scope="module")
def server(checkpoint):
    with start_server(checkpoint) as running:
        with httpx.Client(base_url=running.url, timeout=30) as warm:  # the first caption is slow
            assert post_image(warm, encode(picture(0))).status_code == 200
        yield running


def post_image(client: httpx.Client, data: bytes, name: str = "picture.png", mime: str = "image/png", **params) -> httpx.Response:
    return client.post("/api/caption", files={"image": (name, data, mime)}, params=params)


def assert_json_error(status: int, headers: dict[str, str], body: bytes, want: int, *fragments: str) -> str:
    assert status == want, body
    assert headers.get("content-type", "").startswith("application/json"), headers
    parsed = json.loads(body)
    assert set(parsed) == {"error"}
    message = parsed["error"]
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----- raw sockets --------------------------------------------------------------------------------


def connect(server) -> socket.socket:
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answered(sock: socket.socket) -> bool:
    """Whether the server has sent something (or closed the connection) that is not read yet."""
    return bool(select.select([sock], [], [], 0)[0])


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case names), body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection within ``timeout`` (nothing more is sent before)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def request_head(method: str, path: str, *headers: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1")


def multipart(data: bytes, boundary: str = "captionerboundary") -> tuple[bytes, str]:
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="slow.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# ----- slow clients -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stall", "trickle"])
def test_a_slow_upload_gets_408_at_the_deadline_while_others_are_served(server, how: str) -> None:
    """A client that sends its headers and then stalls half-way through the body (or trickles it,
    a byte every 50 ms: always sending, never done) is answered 408 when the body deadline passes,
    and its connection is closed. Another client is served meanwhile."""
    image = encode(picture(1, (80, 60)))
    if how == "stall":
        body, content_type = image, "image/png"
    else:
        body, content_type = multipart(image)
    slow = connect(server)
    slow.sendall(request_head("POST", "/api/caption", f"Content-Type: {content_type}", f"Content-Length: {len(body)}") + body[:100])
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        normal = post_image(client, encode(picture(2)))
        assert normal.status_code == 200 and normal.json()["caption"] is not None
    assert not answered(slow), f"the slow client was answered before the normal one was ({time.monotonic() - started:.2f} s)"

    sent = 100
    if how == "trickle":
        while not answered(slow) and time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S:
            try:
                slow.send(body[sent : sent + 1])
            except OSError:  # closed just now: the answer is waiting
                break
            sent += 1
            select.select([slow], [], [], 0.05)
        assert sent > 100 + 10 and sent < len(body)  # it made progress all along, and never finished
    status, headers, text = read_response(slow, timeout=BODY_TIMEOUT_S + SLACK_S)
    elapsed = time.monotonic() - started
    assert_json_error(status, headers, text, 408, "took too long", f"{BODY_TIMEOUT_S:g} s")
    assert headers.get("connection") == "close"
    assert BODY_TIMEOUT_S - 0.1 <= elapsed <= BODY_TIMEOUT_S + SLACK_S, elapsed
    assert closed_by_server(slow)
    slow.close()


def test_slow_headers_get_408_and_silent_connections_are_closed(server) -> None:
    """Part of the headers and then nothing (on a new connection, or on a kept-alive one after an
    answer), headers trickled a byte at a time, or nothing at all: each connection is let go once
    the header deadline passes, with a 408 where something was sent. uvicorn alone keeps them all."""
    partial = connect(server)
    partial.sendall(b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    kept_alive = connect(server)
    kept_alive.sendall(request_head("GET", "/healthz"))
    assert read_response(kept_alive)[0] == 200
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: ")
    trickled = connect(server)
    trickled_head = request_head("GET", "/healthz", "X-Padding: " + "x" * 400)
    silent = connect(server)
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:  # others are served meanwhile
        assert client.get("/healthz").status_code == 200
        assert post_image(client, encode(picture(3))).status_code == 200

    sent = 0
    while not answered(trickled) and time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S:
        try:
            trickled.send(trickled_head[sent : sent + 1])
        except OSError:  # closed just now: the answer is waiting
            break
        sent += 1
        select.select([trickled], [], [], 0.02)
    assert sent < len(trickled_head)
    for sock in (partial, kept_alive, trickled):
        status, headers, body = read_response(sock, timeout=HEADER_TIMEOUT_S + SLACK_S)
        assert_json_error(status, headers, body, 408, "headers", f"{HEADER_TIMEOUT_S:g} s")
        assert closed_by_server(sock)
    assert closed_by_server(silent, timeout=HEADER_TIMEOUT_S + SLACK_S)
    elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S, elapsed
    for sock in (partial, kept_alive, trickled, silent):
        sock.close()


def test_a_client_that_keeps_sending_after_its_answer_is_let_go(server) -> None:
    """A refused upload is answered at once, without reading its body; a client that goes on sending
    that body, slowly, is disconnected at the header deadline instead of being read for ever."""
    sock = connect(server)
    sock.sendall(request_head("POST", "/api/caption", "Content-Type: text/plain", "Content-Length: 100000") + b"some text")
    status, headers, body = read_response(sock)
    assert_json_error(status, headers, body, 415, "Content-Type")
    started = time.monotonic()
    while not answered(sock) and time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S:
        try:
            sock.send(b"x")
        except OSError:
            break
        select.select([sock], [], [], 0.05)
    assert closed_by_server(sock, timeout=1.0)
    assert time.monotonic() - started <= HEADER_TIMEOUT_S + SLACK_S
    sock.close()


# ----- many clients -------------------------------------------------------------------------------


def resident_mb() -> float:
    """This process's resident set size (the server runs on one of its threads), in MB.

    Freed memory is first handed back to the system where glibc allows (``malloc_trim``): without
    it, RSS also counts what the allocator keeps for later, which wanders by tens of MB from round
    to round with the sizes of the batches that happened to form, and would hide a leak's trend.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


def caption_concurrently(server, images: list[bytes], threads: int) -> list[httpx.Response | BaseException]:
    """Each thread has its own connection and sends its share of ``images`` one after another."""
    results: list[httpx.Response | BaseException | None] = [None] * len(images)
    barrier = threading.Barrier(threads)

    def work(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            barrier.wait()
            for index in range(offset, len(images), threads):
                try:
                    results[index] = post_image(client, images[index], name=f"image{index}.png")
                except BaseException as error:  # reported by the test, with the others
                    results[index] = error

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [r if r is not None else RuntimeError("no answer") for r in results]


def test_many_concurrent_clients_are_all_served_and_memory_stays_bounded(server) -> None:
    """48 captions over 16 connections at once, three times: every one answered 200, an image gets
    the same caption every time, and after the first (warm-up) round the process's memory stays put."""
    images = [encode(picture(100 + i, (40 + i, 32 + i % 7)), "PNG" if i % 2 else "JPEG") for i in range(48)]

    def round_of_captions() -> list[str]:
        results = caption_concurrently(server, images, threads=16)
        failures = [r if isinstance(r, BaseException) else f"{r.status_code} {r.text}" for r in results if isinstance(r, BaseException) or r.status_code != 200]
        assert not failures, failures[:3]
        return [r.json()["caption"] for r in results]

    first = round_of_captions()  # also the warm-up: thread pools, allocator arenas, batch shapes
    warm = resident_mb()
    later = []
    for _ in range(2):
        assert round_of_captions() == first
        later.append(resident_mb())
    growth = max(later) - warm
    assert growth < 50, f"memory grew by {growth:.0f} MB: {warm:.0f} MB after the warm-up, then {', '.join(f'{m:.0f}' for m in later)} MB"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        batching = client.get("/healthz").json()["batching"]
    assert batching["pending"] == 0 and batching["largest"] > 1


def test_connections_over_the_limit_get_503_until_they_are_released(checkpoint) -> None:
    """With max_connections=3, three open (idle, keep-alive) connections make a fourth client's
    request a JSON 503; the server serves again once they close, or once it closes them itself
    (idle past the header deadline)."""
    with start_server(checkpoint, max_connections=3) as server, httpx.Client(base_url=server.url, timeout=30) as client:

        def hold(count: int) -> list[socket.socket]:
            held = []
            for _ in range(count):
                sock = connect(server)
                sock.sendall(request_head("GET", "/healthz"))
                assert read_response(sock)[0] == 200  # served: surely counted, and now idle
                held.append(sock)
            return held

        def served_again(deadline_s: float) -> httpx.Response:
            end = time.monotonic() + deadline_s
            while True:
                response = client.get("/healthz")
                if response.status_code != 503 or time.monotonic() > end:
                    return response
                time.sleep(0.02)

        assert client.get("/healthz").json()["limits"]["max_connections"] == 3
        client.close()  # from here on, each request of this client opens a fresh connection
        client = httpx.Client(base_url=server.url, timeout=30, headers={"Connection": "close"})

        held = hold(3)
        refused = client.get("/healthz")
        message = assert_json_error(refused.status_code, dict(refused.headers), refused.content, 503, "limit of 3")
        assert "try again" in message and refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        for sock in held:  # the clients go away
            sock.close()
        assert served_again(5.0).status_code == 200
        assert post_image(client, encode(picture(4))).status_code == 200

        held = hold(3)
        assert client.get("/healthz").status_code == 503
        started = time.monotonic()
        assert all(closed_by_server(sock, timeout=HEADER_TIMEOUT_S + SLACK_S) for sock in held)  # the server lets idle ones go
        assert time.monotonic() - started <= HEADER_TIMEOUT_S + SLACK_S
        assert served_again(5.0).status_code == 200
        assert post_image(client, encode(picture(5))).status_code == 200
        for sock in held:
            sock.close()
        client.close()


# ----- bad clients --------------------------------------------------------------------------------


def raw_exchange(server, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(server) as sock:
        sock.sendall(payload)
        return read_response(sock)


def test_a_burst_of_bad_requests_leaves_the_server_serving(server) -> None:
    """Garbage bytes, a broken header, headers over 16 kB, a truncated image, oversize uploads (declared and chunked), the
    wrong Content-Type and a text file, several of each at once: every one a one-line JSON error,
    and the server answers /healthz and captions afterwards."""
    good = encode(picture(6, (120, 90)))
    big = np.random.RandomState(0).bytes(300_000)

    def chunks():
        for _ in range(20):
            yield bytes(16_384)

    bad: list[tuple[str, int, object]] = [
        ("garbage", 400, lambda c: raw_exchange(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n")),
        ("bad header", 400, lambda c: raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")),
        ("endless header", 400, lambda c: raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 20_000)),
        ("bad length", 400, lambda c: raw_exchange(server, request_head("POST", "/api/caption", "Content-Type: image/png", "Content-Length: lots"))),
        ("truncated", 422, lambda c: post_image(c, good[: len(good) // 2], name="cut.png")),
        ("oversize", 413, lambda c: post_image(c, big, name="big.png")),
        ("oversize chunked", 413, lambda c: c.post("/api/caption", content=chunks(), headers={"content-type": "image/png"})),
        ("wrong type", 415, lambda c: c.post("/api/caption", json={"image": "abc"})),
        ("text file", 415, lambda c: post_image(c, b"just words\n", name="notes.txt", mime="text/plain")),
    ]
    outcomes: dict[tuple[str, int], object] = {}

    def send(name: str, send_one, round_: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                answer = send_one(client)
            if isinstance(answer, httpx.Response):
                answer = (answer.status_code, dict(answer.headers), answer.content)
            outcomes[(name, round_)] = answer
        except BaseException as error:
            outcomes[(name, round_)] = error

    threads = [threading.Thread(target=send, args=(name, one, r)) for r in range(3) for name, _, one in bad]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for name, status, _ in bad:
        for r in range(3):
            outcome = outcomes[(name, r)]
            assert isinstance(outcome, tuple), f"{name}: {outcome!r}"
            assert_json_error(*outcome, status)  # type: ignore[misc]

    with httpx.Client(base_url=server.url, timeout=30) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        answer = post_image(client, good)
        assert answer.status_code == 200 and answer.json()["caption"] is not None
