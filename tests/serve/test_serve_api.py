"""The JSON API against a real server (uvicorn on a thread, bound to 127.0.0.1 on a free port)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import make_model

pytest.importorskip("fastapi")

UPLOAD_LIMIT_MB = 0.2  # 200 kB: big enough for the test pictures, cheap to exceed
BATCH_WAIT_MS = 100.0  # wide enough that requests sent together are batched even on a slow machine


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_model(pretrained=True).save(tmp_path_factory.mktemp("serve_api") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A second copy of the served model, for expected captions (the served one belongs to its thread)."""
    from captioner.models.captioner import Captioner

    return Captioner.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    config = ServeConfig(beam_size=5, n_best=3, max_batch=16, batch_wait_ms=BATCH_WAIT_MS, max_upload_mb=UPLOAD_LIMIT_MB)
    app = create_app(Captioner.load(checkpoint), config, model_name="test-model")
    with BackgroundServer(app) as running:
        running.app = app
        yield running


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as session:
        yield session


def expected(reference, image: Image.Image, beam_size: int = 5, n_best: int = 3):
    return reference.caption(image, beam_size=beam_size, n_best=n_best)


def post_image(client: httpx.Client, data: bytes, name: str = "picture.png", mime: str = "image/png", **params) -> httpx.Response:
    return client.post("/api/caption", files={"image": (name, data, mime)}, params=params)


def assert_error(response: httpx.Response, status: int | tuple[int, ...], *fragments: str) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# ----- happy paths --------------------------------------------------------------------------------


def test_healthz_describes_the_model_and_limits(client) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["model"]["decoder"] == "attention"
    assert body["model"]["attention"] is True
    assert body["model"]["vocab_size"] == 7  # 4 special tokens + a, b, c
    assert body["model"]["encoder"] == "efficientnet_lite0"
    assert body["model"]["name"] == "test-model"
    assert (body["model"]["decoders"], body["model"]["views"]) == (1, ["plain"])
    assert (body["model"]["length_penalty"], body["model"]["no_repeat_ngram_size"]) == (0.0, 0)
    assert body["defaults"] == {"beam_size": 5, "n_best": 3}
    assert body["limits"]["max_upload_bytes"] == 200_000
    assert body["batching"]["max_batch"] == 16
    assert {"batches", "images", "largest", "sizes", "pending"} <= set(body["batching"])


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_caption_an_image(client, reference, fmt: str, mime: str) -> None:
    data = encode(picture(1, (80, 60)), fmt)
    response = post_image(client, data, name=f"photo.{fmt.lower()}", mime=mime)
    assert response.status_code == 200, response.text
    body = response.json()
    want = expected(reference, Image.open(io.BytesIO(data)))
    assert body["caption"] == want.text
    assert body["words"] == want.words
    assert body["score"] == pytest.approx(want.score, abs=1e-3)
    assert body["log_prob"] == pytest.approx(want.log_prob, abs=1e-3)
    assert [entry["caption"] for entry in body["n_best"]] == [r.text for r in want.n_best]
    assert len(body["n_best"]) == 3 and body["n_best"][0]["caption"] == body["caption"]
    assert (body["width"], body["height"]) == (80, 60)
    assert body["settings"] == {"beam_size": 5, "n_best": 3}

    attention = np.asarray(body["attention"])
    assert attention.shape == (len(body["words"]), 7, 7)  # lite0 "last_stage" at 224 px: a 7 x 7 grid
    assert body["attention_shape"] == [7, 7]
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=0.01)
    np.testing.assert_allclose(attention, want.attention, atol=1e-3)
    assert body["attention_region"] == {"left": 0.0, "top": 0.0, "right": 1.0, "bottom": 1.0}
    assert body["batch_size"] >= 1
    assert set(body["timing_ms"]) == {"upload", "decode", "queue", "model", "total"}


def test_an_upload_near_the_limit_is_accepted(client) -> None:
    data = encode(picture(9, (200, 160)), "PNG")  # random pixels do not compress: ~96 kB
    assert 50_000 < len(data) < 200_000
    response = post_image(client, data, name="large.png")
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (200, 160)


def test_exif_rotation_is_applied_to_the_reported_size(client) -> None:
    image = picture(2, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 40 wide, 80 tall
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    body = post_image(client, buffer.getvalue(), name="rotated.jpg", mime="image/jpeg").json()
    assert (body["width"], body["height"]) == (40, 80)


def test_raw_body_upload_and_settings_in_the_form(client, reference) -> None:
    data = encode(picture(3), "PNG")
    raw = client.post("/api/caption", content=data, headers={"content-type": "image/png"}, params={"beam_size": 2, "n_best": 1})
    assert raw.status_code == 200, raw.text
    assert raw.json()["caption"] == expected(reference, Image.open(io.BytesIO(data)), 2, 1).text
    form = client.post("/api/caption", files={"image": ("p.png", data, "image/png")}, data={"beam_size": "2", "n_best": "1"})
    assert form.json()["caption"] == raw.json()["caption"]
    assert form.json()["settings"] == {"beam_size": 2, "n_best": 1}
    assert len(form.json()["n_best"]) == 1


def test_n_best_widens_the_beam(client) -> None:
    body = post_image(client, encode(picture(4), "PNG"), beam_size=2, n_best=4).json()
    assert body["settings"] == {"beam_size": 4, "n_best": 4}
    assert len(body["n_best"]) == 4
    scores = [entry["score"] for entry in body["n_best"]]
    assert scores == sorted(scores, reverse=True)


# ----- batching -----------------------------------------------------------------------------------


def send_together(server, requests: list[tuple[bytes, dict]]) -> list[httpx.Response]:
    """Send every request at the same moment, each from its own thread and connection."""
    responses: list[httpx.Response | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(index: int) -> None:
        data, params = requests[index]
        with httpx.Client(base_url=server.url, timeout=60) as session:
            barrier.wait()
            responses[index] = post_image(session, data, name=f"image{index}.png", **params)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in responses if r is not None]


def test_concurrent_requests_are_batched_and_each_gets_its_own_caption(server, client, reference) -> None:
    images = [picture(10 + i, (48 + 4 * i, 40 + i)) for i in range(12)]
    data = [encode(image, "PNG") for image in images]
    wanted = [expected(reference, image).text for image in images]
    assert len(set(wanted)) > 1, "the test images should not all get the same caption"
    before = client.get("/healthz").json()["batching"]

    responses = send_together(server, [(d, {}) for d in data])

    after = client.get("/healthz").json()["batching"]
    assert [r.status_code for r in responses] == [200] * 12
    bodies = [r.json() for r in responses]
    assert [b["caption"] for b in bodies] == wanted
    assert [(b["width"], b["height"]) for b in bodies] == [image.size for image in images]
    batches = after["batches"] - before["batches"]
    assert after["images"] - before["images"] == 12
    assert batches < 12, f"12 concurrent requests ran in {batches} batches"
    assert max(b["batch_size"] for b in bodies) > 1


def test_requests_with_different_settings_are_not_mixed(server, client) -> None:
    data = encode(picture(30), "PNG")
    settings = [{"beam_size": 1, "n_best": 1}, {"beam_size": 3, "n_best": 2}] * 4
    responses = send_together(server, [(data, s) for s in settings])
    bodies = [r.json() for r in responses]
    for body, asked in zip(bodies, settings):
        assert body["settings"] == asked
        assert len(body["n_best"]) == asked["n_best"]
        assert body["batch_size"] <= 4  # only the 4 requests with the same settings can share a batch
    greedy = [b for b, s in zip(bodies, settings) if s["beam_size"] == 1]
    assert len({b["caption"] for b in greedy}) == 1


# ----- limits and errors --------------------------------------------------------------------------


def test_an_upload_over_the_limit_is_refused_with_413(client) -> None:
    big = np.random.RandomState(0).bytes(300_000)
    assert_error(post_image(client, big, name="big.png"), 413, "too large", "0.2 MB")
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_file_just_over_the_limit_is_counted_and_refused(client) -> None:
    # The request body fits the body limit (the file limit + room for the multipart framing),
    # so this is caught by counting the file's bytes, not by Content-Length.
    assert_error(post_image(client, b"\x89PNG" + bytes(200_100), name="big.png"), 413, "too large")


def test_a_chunked_upload_without_length_is_counted_and_refused(client) -> None:
    def chunks():
        for _ in range(40):
            yield bytes(16_384)

    response = client.post("/api/caption", content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too large")
    assert client.get("/healthz").status_code == 200


def test_a_text_file_is_refused_and_the_server_keeps_serving(client) -> None:
    message = assert_error(post_image(client, b"just some words\n", name="notes.txt", mime="text/plain"), 415, "not an image")
    assert "notes.txt" in message
    after = post_image(client, encode(picture(5), "PNG"))
    assert after.status_code == 200 and after.json()["caption"]


def test_a_truncated_image_is_refused(client) -> None:
    data = encode(picture(6, (120, 90)), "PNG")
    assert_error(post_image(client, data[: len(data) // 2], name="cut.png"), 422, "cut.png", "truncated")


def test_an_empty_file_is_refused(client) -> None:
    assert_error(post_image(client, b"", name="empty.png"), 422, "empty")


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 21}, "beam_size"),
        ({"beam_size": "wide"}, "beam_size"),
        ({"n_best": 0}, "n_best"),
        ({"n_best": 11}, "n_best"),
        ({"n_best": "2.5"}, "n_best"),
        ({"beam_size": "1_0"}, "beam_size"),  # Python's int() reads these as 10 and 3
        ({"n_best": "\u0663"}, "n_best"),
    ],
)
def test_bad_settings_are_refused(client, params: dict, fragment: str) -> None:
    assert_error(post_image(client, encode(picture(7), "PNG"), **params), 422, fragment)


def test_requests_without_an_image_are_refused(client) -> None:
    assert_error(client.post("/api/caption", data={"beam_size": "3"}, files={"other": ("x.png", b"x", "image/png")}), 422, "'image'")
    assert_error(client.post("/api/caption", data={"image": "not a file"}, files={"x": ("x", b"x")}), 422, "must be a file")
    assert_error(client.post("/api/caption", json={"image": "abc"}), 415, "multipart/form-data")
    assert_error(client.post("/api/caption"), 415)


def test_unknown_routes_and_methods_answer_json(client) -> None:
    assert_error(client.get("/nowhere"), 404, "/nowhere")
    assert_error(client.get("/api/caption"), 405)


def test_head_requests_are_answered(client) -> None:
    assert client.head("/").status_code == 200
    assert client.head("/healthz").status_code == 200


def test_the_page_and_its_assets_are_served_locally(client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert 'id="file-input"' in html and 'type="file"' in html
    assert '<label for="file-input"' in html
    for asset in ("static/app.js", "static/style.css"):
        assert asset in html
        served = client.get("/" + asset)
        assert served.status_code == 200
        for text in (html, served.text):
            assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_a_model_without_attention_answers_null_attention(tmp_path) -> None:
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    folder = make_model(kind="show_tell", pretrained=True).save(tmp_path / "show_tell")
    app = create_app(Captioner.load(folder), ServeConfig(batch_wait_ms=0))
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        assert session.get("/healthz").json()["model"]["attention"] is False
        body = post_image(session, encode(picture(8), "PNG")).json()
    assert body["caption"] is not None
    assert body["attention"] is None and body["attention_shape"] is None


def test_the_models_own_decoding_settings_make_the_served_captions(tmp_path) -> None:
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    model = make_model(pretrained=True)
    model.config.length_penalty, model.config.no_repeat_ngram_size = 2.0, 1
    folder = model.save(tmp_path / "long")
    data = encode(picture(9), "PNG")
    want = Captioner.load(folder).caption(Image.open(io.BytesIO(data)), beam_size=5, n_best=3)
    app = create_app(Captioner.load(folder), ServeConfig(batch_wait_ms=0))
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        info = session.get("/healthz").json()["model"]
        body = post_image(session, data).json()
    assert (info["length_penalty"], info["no_repeat_ngram_size"]) == (2.0, 1)
    assert body["caption"] == want.text and body["score"] == pytest.approx(want.score, abs=1e-3)
    assert len(set(body["words"])) == len(body["words"])  # no word twice
    assert body["score"] != pytest.approx(body["log_prob"], abs=1e-3)  # ranked with the penalty, not by log-probability


def test_a_model_failure_is_a_json_500_and_the_server_recovers(tmp_path, monkeypatch) -> None:
    import captioner.decoding as decoding
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    real_generate = decoding.generate
    calls = {"n": 0}

    def flaky_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory\nsecond line")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(decoding, "generate", flaky_generate)
    folder = make_model(pretrained=True).save(tmp_path / "ckpt")
    app = create_app(Captioner.load(folder), ServeConfig(batch_wait_ms=0))
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        data = encode(picture(11), "PNG")
        assert_error(post_image(session, data), 500, "internal error", "RuntimeError")
        assert post_image(session, data).status_code == 200
        batching = session.get("/healthz").json()["batching"]
    assert batching["failed_batches"] == 1 and batching["batches"] == 2


def test_requests_past_the_queue_limit_get_503_and_the_server_recovers(checkpoint, monkeypatch) -> None:
    # a model that holds each batch until released; with max_pending=1 the third concurrent request
    # (one running, one queued) finds the queue full
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app
    from captioner.serve.captioning import ModelRunner

    release, entered = threading.Event(), threading.Event()
    original = ModelRunner.__call__

    def held(self, settings, images):
        entered.set()
        release.wait(timeout=60)
        return original(self, settings, images)

    monkeypatch.setattr(ModelRunner, "__call__", held)
    config = ServeConfig(beam_size=1, n_best=1, max_batch=1, batch_wait_ms=0, max_pending=1)
    data = encode(picture(9), "PNG")
    with BackgroundServer(create_app(Captioner.load(checkpoint), config)) as server, ThreadPoolExecutor(4) as pool:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            waiting = [pool.submit(post_image, client, data)]
            assert entered.wait(timeout=30)  # the first is held by the model
            waiting.append(pool.submit(post_image, client, data))
            deadline = time.monotonic() + 30  # until the second is queued
            while client.get("/healthz").json()["batching"]["pending"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            busy = post_image(client, data)
            release.set()
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
            assert [future.result().status_code for future in waiting] == [200, 200]
            assert post_image(client, data).status_code == 200


# ----- hosts and decoded size --------------------------------------------------------------------


def test_a_request_for_another_host_is_refused_unless_that_host_is_allowed(checkpoint) -> None:
    # DNS rebinding: a page on evil.example gets its name resolved to 127.0.0.1, and the browser sends Host: evil.example
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    model = Captioner.load(checkpoint)
    with BackgroundServer(create_app(model, ServeConfig(batch_wait_ms=0))) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.0.0.7"):
            assert session.get("/healthz", headers={"host": host}).status_code == 200, host
        assert session.get("/healthz").json()["allowed_hosts"] == ["IP addresses", "localhost"]
        for path in ("/", "/healthz", "/api/caption"):
            assert_error(session.get(path, headers={"host": "evil.example:8000"}), 403, "'evil.example'", "--allowed-host evil.example")
        refused = session.post("/api/caption", files={"image": ("x.png", encode(picture(3), "PNG"), "image/png")}, headers={"host": "evil.example"})
        assert_error(refused, 403, "DNS rebinding")
    config = ServeConfig(batch_wait_ms=0, allowed_hosts=("captions.example",))
    with BackgroundServer(create_app(model, config)) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        assert session.get("/healthz", headers={"host": "captions.example"}).status_code == 200
        assert session.get("/healthz", headers={"host": "evil.example"}).status_code == 403


def test_an_image_that_decodes_to_too_many_pixels_is_refused(checkpoint) -> None:
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    config = ServeConfig(batch_wait_ms=0, max_image_pixels=150_000)
    with BackgroundServer(create_app(Captioner.load(checkpoint), config)) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        assert session.get("/healthz").json()["limits"]["max_image_pixels"] == 150_000
        assert_error(post_image(session, encode(picture(4, (500, 400)), "PNG"), name="wide.png"), 422, "wide.png", "500x400 pixels", "150,000")
        # a JPEG counts at its reduced decoding size: this 1600 x 1200 photo (1.9 million pixels) decodes at 400 x 300
        photo = encode(picture(5, (1600, 1200)), "JPEG")
        answer = post_image(session, photo, name="photo.jpg", mime="image/jpeg")
        assert answer.status_code == 200 and (answer.json()["width"], answer.json()["height"]) == (1600, 1200), answer.text


def test_the_answer_says_what_the_caption_had_to_name_and_whether_the_photo_was_familiar() -> None:
    # an encoder with its ImageNet classifier, a model whose own settings make its likeliest concept
    # a constraint: the dog photo's caption must name "dog", and the answer says so; with the photo
    # itself as the only "training photo", it is familiar and nothing is required of it
    import torch
    from conftest import make_vocab

    from captioner.data.images import load_image
    from captioner.models.captioner import Captioner, CaptionerConfig
    from captioner.models.decoder import DecoderConfig
    from captioner.models.encoder import EncoderConfig
    from captioner.models.familiarity import Familiarity, pooled
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    decoder = DecoderConfig(kind="attention", embed_dim=16, hidden_dim=24, attention_dim=12)
    config = CaptionerConfig(encoder=EncoderConfig(feature_layer="head", pretrained=True), decoder=decoder, concept_constraints=1, concept_threshold=0.3)
    torch.manual_seed(0)
    model = Captioner(config, make_vocab(("a", "b", "dog"))).eval()
    dog = Path(__file__).resolve().parents[2] / "examples" / "dog.jpg"
    noise = encode(picture(11), "PNG")
    with BackgroundServer(create_app(model, ServeConfig(beam_size=3, n_best=1, batch_wait_ms=0))) as running, httpx.Client(base_url=running.url, timeout=30) as session:
        steered = post_image(session, dog.read_bytes(), name="dog.jpg", mime="image/jpeg").json()
        assert steered["constraints"] == [["dog"]] and steered["constraints_met"] is True and "dog" in steered["words"], steered
        assert steered["familiar"] is None  # the model has no familiar photos: not asked
        model.familiarity = Familiarity(pooled(model.features(model.preprocessing(load_image(dog)).unsqueeze(0))), torch.tensor([0.01, 0.02]))
        model.config.concept_familiar_percentile = 50.0
        familiar = post_image(session, dog.read_bytes(), name="dog.jpg", mime="image/jpeg").json()
        other = post_image(session, noise).json()
    assert familiar["familiar"] is True and familiar["constraints"] == [] and familiar["constraints_met"] is None, familiar
    assert familiar["tags"] == steered["tags"]  # still seen, no longer required
    assert other["familiar"] is False, other
