"""``captioner serve`` on the command line: startup, one-line errors, the printed URL, Ctrl+C."""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_model
from PIL import Image

from captioner.cli.main import main

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_model(pretrained=True).save(tmp_path_factory.mktemp("serve_cli") / "ckpt")


@pytest.fixture()
def no_binding(monkeypatch):
    """Fail the test if the command gets as far as listening on the port (checking it is free is fine)."""
    from captioner.serve import server

    original = server.bind_socket

    def refuse(host, port, *, listen=True, **kwargs):
        if listen:
            raise AssertionError("the port was bound")
        return original(host, port, listen=False, **kwargs)

    monkeypatch.setattr(server, "bind_socket", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("captioner serve: error: ")
    return err[0]


def test_serve_is_a_command() -> None:
    from captioner.cli.main import command_names

    assert "serve" in command_names()


def test_a_missing_checkpoint_is_one_line_before_binding(tmp_path, capsys, no_binding) -> None:
    assert main(["serve", str(tmp_path / "missing")]) != 0
    assert "missing" in one_error_line(capsys)


def test_a_corrupt_checkpoint_is_one_line_before_binding(tmp_path, capsys, no_binding) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "vocab.json").write_text("[]")
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["serve", str(folder)]) != 0
    one_error_line(capsys)


@pytest.mark.parametrize(
    "option,fragment",
    [
        (["--beam", "0"], "--beam"),
        (["--n-best", "11"], "--n-best"),
        (["--max-batch", "0"], "--max-batch"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--max-upload-mb", "0"], "--max-upload-mb"),
        (["--max-upload-mb", "1e-9"], "--max-upload-mb must be a number from 0.001 to 1000"),
        (["--port", "70000"], "--port"),
        (["--body-timeout-s", "0"], "--body-timeout-s"),
        (["--header-timeout-s", "-1"], "--header-timeout-s"),
        (["--max-connections", "0"], "--max-connections"),
        (["--max-image-pixels", "10"], "--max-image-pixels"),
        (["--decode-workers", "0"], "--decode-workers"),
        (["--allowed-host", "evil.example/path"], "--allowed-host"),
        (["--beam", "21"], "--beam"),
        (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
    ],
)
def test_bad_options_are_refused_before_loading(checkpoint, capsys, no_binding, option, fragment) -> None:
    assert main(["serve", str(checkpoint), *option]) == 2
    assert fragment in one_error_line(capsys)


def test_a_port_in_use_is_one_line_before_loading(checkpoint, capsys, monkeypatch) -> None:
    import captioner.models.captioner as models

    monkeypatch.setattr(models.Captioner, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded the model")))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) != 0
    line = one_error_line(capsys)
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(checkpoint) -> None:
    command = [sys.executable, "-m", "captioner", "serve", str(checkpoint), "--port", "0", "--batch-wait-ms", "1", "--n-best", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and process.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if " ready at " in line:
                url = line.rsplit(" ready at ", 1)[1].strip()
        assert url and url.startswith("http://127.0.0.1:"), f"no URL printed; stderr: {process.stderr.read() if process.poll() is not None else ''}"

        health = httpx.get(url + "healthz", timeout=10).json()
        assert health["status"] == "ok" and health["defaults"] == {"beam_size": 3, "n_best": 2}  # the one default beam (captioner.limits)
        buffer = io.BytesIO()
        Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(buffer, format="PNG")
        answer = httpx.post(url + "api/caption", files={"image": ("x.png", buffer.getvalue(), "image/png")}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["n_best"]) == 2
        broken = b"garbage where the first boundary should be\r\n"
        refused = httpx.post(url + "api/caption", content=broken, headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=30)
        assert 400 <= refused.status_code < 500 and "error" in refused.json()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rc = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    stderr = process.stderr.read()
    assert rc == 0, stderr
    assert "stopped" in stderr and "Traceback" not in stderr
    assert "boundary" not in stderr.lower(), stderr  # the client's malformed upload is not logged as a server warning
