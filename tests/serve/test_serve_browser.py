"""The page in a real headless browser: Debian's Chromium driven by Playwright.

Needs /usr/bin/chromium (``apt-get install chromium``); skipped, saying so, where it is missing.
Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_model
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")


def noise_png(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    rng = np.random.RandomState(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wordy_model():
    """An untrained model whose captions are always 8 words long: its <end> is never likely (an
    untrained model's caption lengths otherwise hang on its random weights; these tests need words
    to hover over, and a caption that no other text on the page contains)."""
    import torch

    model = make_model(pretrained=True)
    model.config.max_length = 8
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.end_id] -= 30.0
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    folder = wordy_model().save(tmp_path_factory.mktemp("serve_browser") / "ckpt")
    app = create_app(Captioner.load(folder), ServeConfig(beam_size=3, n_best=3, batch_wait_ms=2), model_name="browser-test")
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.set_default_timeout(15_000)
    opened = context.new_page()
    problems: list[str] = []
    requests: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on(
        "console",
        # Chromium logs every non-2xx fetch as a console error; those are expected in error tests.
        lambda message: problems.append(f"console: {message.text}")
        if message.type == "error" and "Failed to load resource" not in message.text
        else None,
    )
    opened.on("request", lambda request: requests.append(request.url))
    opened.goto(server.url)
    opened.wait_for_selector("body[data-ready]")
    opened.problems = problems
    opened.requests = requests
    yield opened
    context.close()
    assert not problems, problems
    outside = [url for url in requests if not url.startswith((server.url, "blob:", "data:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"


def api_caption(server, data: bytes, **params) -> dict:
    response = httpx.post(server.url + "api/caption", files={"image": ("x.png", data, "image/png")}, params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def upload(page, tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    page.set_input_files("#file-input", str(path))


def overlay_state(page) -> dict:
    return page.evaluate(
        """() => {
            const overlay = document.getElementById("overlay");
            return {hidden: overlay.hidden, ...overlay.dataset, width: overlay.width, height: overlay.height,
                    active: document.getElementById("caption").dataset.activeIndex ?? null};
        }"""
    )


def veil_alpha(page, x: float, y: float) -> int:
    """The overlay's opacity at a point given as fractions of the image (0 = not veiled)."""
    return page.evaluate(
        """([x, y]) => {
            const canvas = document.getElementById("overlay");
            const px = Math.min(canvas.width - 1, Math.floor(x * canvas.width));
            const py = Math.min(canvas.height - 1, Math.floor(y * canvas.height));
            return canvas.getContext("2d").getImageData(px, py, 1, 1).data[3];
        }""",
        [x, y],
    )


def test_the_page_captions_an_upload_like_the_api(page, server, tmp_path) -> None:
    data = noise_png(1)
    expected = api_caption(server, data, beam_size=3, n_best=3)
    assert page.input_value("#beam-size") == "3" and page.input_value("#n-best") == "3"
    assert "browser-test" in page.inner_text("#model-info")

    upload(page, tmp_path, "noise.png", data)
    page.wait_for_selector("#caption .word")
    assert page.get_attribute("#caption", "data-caption") == expected["caption"]
    assert " ".join(page.inner_text("#caption").split()) == expected["caption"]
    assert page.locator("#caption .word").count() == len(expected["words"])
    assert page.locator("#n-best-list li").count() == 3
    assert [" ".join(t.split()) for t in page.locator("#n-best-list li > span:first-child").all_inner_texts()] == [
        entry["caption"] for entry in expected["n_best"]
    ]
    assert page.is_hidden("#error")
    assert page.is_visible("#preview")
    assert page.get_attribute("#result", "aria-busy") == "false"


def test_hovering_a_word_overlays_its_attention(page, server, tmp_path) -> None:
    data = noise_png(2)
    expected = api_caption(server, data)
    words = expected["words"]
    assert len(words) >= 2
    upload(page, tmp_path, "noise.png", data)
    page.wait_for_selector("#caption .word")
    assert overlay_state(page)["hidden"] is True

    last = len(words) - 1
    for index in (0, last):
        page.hover(f"#caption .word[data-index='{index}']")
        page.wait_for_function(f"document.getElementById('overlay').dataset.wordIndex === '{index}'")
        state = overlay_state(page)
        assert state["hidden"] is False
        assert state["word"] == words[index] and state["active"] == str(index)
        assert state["width"] > 0 and state["height"] > 0
        assert page.get_attribute(f"#caption .word[data-index='{index}']", "class") == "word active"

        # The overlay follows the grid: the most attended cell is the least veiled, the least attended the most.
        grid = np.asarray(expected["attention"][index])
        rows, cols = grid.shape
        peak = np.unravel_index(np.argmax(grid), grid.shape)
        low = np.unravel_index(np.argmin(grid), grid.shape)
        assert float(state["peakX"]) == pytest.approx((peak[1] + 0.5) / cols, abs=1e-3)
        assert float(state["peakY"]) == pytest.approx((peak[0] + 0.5) / rows, abs=1e-3)
        at_peak = veil_alpha(page, (peak[1] + 0.5) / cols, (peak[0] + 0.5) / rows)
        at_low = veil_alpha(page, (low[1] + 0.5) / cols, (low[0] + 0.5) / rows)
        assert at_peak < at_low
        assert at_low > 100
    assert "where the model looked" in page.inner_text("#attention-label")

    page.hover("h1")
    page.wait_for_selector("#overlay", state="hidden")
    assert overlay_state(page)["active"] is None


def test_words_work_from_the_keyboard_and_clicks_pin_them(page, server, tmp_path) -> None:
    upload(page, tmp_path, "noise.png", noise_png(3))
    page.wait_for_selector("#caption .word")
    words = page.locator("#caption .word")
    assert words.count() >= 2

    words.nth(0).focus()
    assert overlay_state(page)["wordIndex"] == "0"
    page.keyboard.press("ArrowRight")
    assert overlay_state(page)["wordIndex"] == "1"
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    page.keyboard.press("Escape")
    assert overlay_state(page)["hidden"] is True

    words.nth(1).click()
    assert words.nth(1).get_attribute("aria-pressed") == "true"
    page.mouse.move(5, 5)
    page.evaluate("document.activeElement.blur()")
    assert overlay_state(page)["wordIndex"] == "1"  # pinned: stays after the pointer and focus leave
    words.nth(1).click()
    assert words.nth(1).get_attribute("aria-pressed") == "false"


def test_errors_are_shown_and_the_next_upload_works(page, server, tmp_path) -> None:
    upload(page, tmp_path, "notes.txt", b"this is not a picture\n")
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error")
    assert page.get_attribute("#error", "role") == "alert"

    upload(page, tmp_path, "good.png", noise_png(4))
    page.wait_for_selector("#caption .word")
    assert page.is_hidden("#error")


def test_a_bad_setting_shows_the_servers_message(page, server, tmp_path) -> None:
    page.fill("#n-best", "50")
    upload(page, tmp_path, "good.png", noise_png(5))
    page.wait_for_selector("#error:not([hidden])")
    assert "n_best" in page.inner_text("#error")
    page.fill("#n-best", "2")
    page.dispatch_event("#n-best", "change")  # changing a setting captions the same image again
    page.wait_for_selector("#caption .word")
    assert page.locator("#n-best-list li").count() == 2


def test_dropping_an_image_captions_it(page, server) -> None:
    data = noise_png(6)
    expected = api_caption(server, data)
    transfer = page.evaluate_handle(
        """(encoded) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return transfer;
        }""",
        base64.b64encode(data).decode(),
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#caption .word")
    assert page.get_attribute("#caption", "data-caption") == expected["caption"]


def test_the_file_picker_is_the_first_thing_keyboard_focus_reaches(page) -> None:
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file-input"
    assert page.evaluate("document.activeElement.labels.length") == 1
    for control in ("#beam-size", "#n-best"):
        assert page.evaluate(f"document.querySelector('{control}').labels.length") == 1


def test_the_overlay_holds_steady_under_the_pointer_on_a_narrow_screen(page, server, tmp_path) -> None:
    # Showing a word's attention must not move the words (which would flicker hover on and off).
    page.set_viewport_size({"width": 400, "height": 900})
    upload(page, tmp_path, "noise.png", noise_png(2))
    page.wait_for_selector("#caption .word")
    page.hover("#caption .word >> nth=0")
    box = page.locator("#caption .word").first.bounding_box()  # after hover scrolled it into view
    samples = []
    for _ in range(10):
        page.wait_for_timeout(30)
        samples.append(overlay_state(page)["hidden"])
    assert samples == [False] * 10
    assert page.locator("#caption .word").first.bounding_box() == box


def test_the_n_best_list_shows_the_score_it_is_ranked_by_and_the_caption_appears_once(browser, tmp_path) -> None:
    # with a length penalty the list is ranked by the penalised score, not by log p: show both
    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    model = wordy_model()
    model.config.length_penalty = 1.0
    loaded = Captioner.load(model.save(tmp_path / "penalised"))
    with BackgroundServer(create_app(loaded, ServeConfig(beam_size=3, n_best=3, batch_wait_ms=2))) as running:
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(running.url)
        page.wait_for_selector("body[data-ready]")
        data = noise_png(5)
        expected = api_caption(running, data, beam_size=3, n_best=3)
        upload(page, tmp_path, "noise.png", data)
        page.wait_for_selector("#caption .word")
        scores = page.locator("#n-best-list li .score").all_inner_texts()
        for shown, entry in zip(scores, expected["n_best"]):
            assert shown == f"score {entry['score']:.2f} · log p {entry['log_prob']:.2f}", shown
        ranked = [float(value) for value in page.eval_on_selector_all("#n-best-list li", "items => items.map(i => i.dataset.score)")]
        assert ranked == sorted(ranked, reverse=True)
        outside = page.evaluate("() => Array.from(document.querySelectorAll('main > :not(#result)')).map(e => e.innerText).join(' ')")
        assert expected["caption"] not in " ".join(outside.split())  # shown in the result panel only, not again above it
        assert page.get_attribute("#caption", "aria-live") == "polite"  # where screen readers hear it
        context.close()


def test_the_page_shows_the_visual_concepts_the_api_returns(browser, tmp_path) -> None:
    # an encoder with its ImageNet classifier (EfficientNet-Lite0's head): the dog photo's concepts
    # are listed under the caption, likeliest first, with the API's probabilities
    from conftest import make_vocab

    from captioner.models.captioner import Captioner, CaptionerConfig
    from captioner.models.decoder import DecoderConfig
    from captioner.models.encoder import EncoderConfig
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    config = CaptionerConfig(encoder=EncoderConfig(feature_layer="head", pretrained=True), decoder=DecoderConfig(kind="attention", embed_dim=16, hidden_dim=24, attention_dim=12))
    model = Captioner(config, make_vocab(("a", "b", "c")))
    assert model.encoder.has_classifier
    data = (Path(__file__).resolve().parents[2] / "examples" / "dog.jpg").read_bytes()
    with BackgroundServer(create_app(model, ServeConfig(beam_size=3, n_best=1, batch_wait_ms=2))) as running:
        expected = api_caption(running, data, beam_size=3, n_best=1)
        assert expected["tags"] and expected["tags"][0]["word"] == "dog", expected["tags"]
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(running.url)
        page.wait_for_selector("body[data-ready]")
        upload(page, tmp_path, "dog.jpg", data)
        page.wait_for_selector("#tags li")
        assert page.locator("#tags").is_visible() and page.locator("#tags-heading").is_visible()
        shown = page.locator("#tags li").all_inner_texts()
        assert shown == [f"{tag['word']} {math.floor(tag['probability'] * 100 + 0.5)}%" for tag in expected["tags"]]  # as Math.round, shown
        context.close()


def test_the_page_says_what_the_caption_had_to_name_or_that_the_photo_was_familiar(browser, tmp_path) -> None:
    # a model whose own settings make the dog photo's likeliest concept a constraint: the page says
    # the caption had to name it; the server's own answer, edited, stands in for a caption that
    # could not (constraints_met false) and for a familiar photo, which the page says in words too
    import torch
    from conftest import make_vocab

    from captioner.models.captioner import Captioner, CaptionerConfig
    from captioner.models.decoder import DecoderConfig
    from captioner.models.encoder import EncoderConfig
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    decoder = DecoderConfig(kind="attention", embed_dim=16, hidden_dim=24, attention_dim=12)
    config = CaptionerConfig(encoder=EncoderConfig(feature_layer="head", pretrained=True), decoder=decoder, concept_constraints=1, concept_threshold=0.3)
    torch.manual_seed(0)
    model = Captioner(config, make_vocab(("a", "b", "dog", "dogs"))).eval()
    data = (Path(__file__).resolve().parents[2] / "examples" / "dog.jpg").read_bytes()
    edits = [
        None,  # the server's answer as it is
        {"constraints_met": False},
        {"constraints": [], "constraints_met": None, "familiar": True},
        {"constraints": [], "constraints_met": None, "familiar": False},
    ]
    shown = []
    with BackgroundServer(create_app(model, ServeConfig(beam_size=3, n_best=1, batch_wait_ms=2))) as running:
        answer = api_caption(running, data, beam_size=3, n_best=1)
        assert answer["constraints"] == [["dog", "dogs"]] and answer["constraints_met"] is True, answer
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(running.url)
        page.wait_for_selector("body[data-ready]")
        for number, edit in enumerate(edits):
            if edit is not None:
                page.route(re.compile(r"/api/caption"), lambda route, _request, edit=edit: route.fulfill(json={**answer, **edit}))
            page.evaluate("() => { window.captionerResult = null; }")
            upload(page, tmp_path, f"dog{number}.jpg", data)  # a new file each time: picking the same one again is no change
            page.wait_for_function("() => window.captionerResult !== null")
            shown.append(page.locator("#steering").inner_text() if page.locator("#steering").is_visible() else None)
            page.unroute(re.compile(r"/api/caption"))
        context.close()
    assert shown == [
        "The caption had to name dog (or dogs).",
        "No caption it could write names dog (or dogs): this is its best caption without it.",
        "A photo like the model's training photos: no concept was required of the caption.",
        None,  # unfamiliar, and nothing likely enough to require: nothing to say
    ], shown
