"""``captioner caption`` over many photos: resuming a stopped run, and sharing one across torchrun processes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_model
from test_caption_command import write_image

pytestmark = pytest.mark.usefixtures("one_thread_per_process")  # several processes share the cores here


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model("attention", pretrained=True).save(tmp_path_factory.mktemp("scale_model") / "attention")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for n in range(30):
        write_image(root / f"{n:03d}.png", n)
    (root / "broken.jpg").write_text("not a JPEG")  # never captioned, so a resumed run tries it again
    return root


def caption(*args, torchrun=False, **kwargs):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    return [*launcher, "-m", "captioner", "caption", *map(str, args)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def captions(found: list[dict]) -> list[tuple[str, str, list[str]]]:
    """What must match between runs; scores may differ in their last digit with the batch's makeup."""
    return [(record["source"], record["caption"], [other["caption"] for other in record["n_best"]]) for record in found]


def start_then_stop(command: list[str], out: Path, stop) -> subprocess.Popen:
    """Start ``command``; once some part file of ``out`` holds 3 records, ``stop(process)``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if sum(len(part.read_text().splitlines()) for part in out.parent.glob(out.name + ".*partial")) >= 3:
            stop(process)
            break
        time.sleep(0.05)
    process.communicate(timeout=240)
    return process


@pytest.fixture(scope="module")
def one_process(model, folder, tmp_path_factory):
    """The reference: every photo captioned by one process, in one run."""
    out = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    done = subprocess.run(caption(folder, "--model", model, "--json", out, "--quiet"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "broken.jpg" in done.stderr  # the one broken file
    found = records(out)
    assert [record["source"] for record in found] == [str(folder / f"{n:03d}.png") for n in range(30)]
    return found


def test_a_stopped_run_resumes_with_what_it_lacks_and_is_never_overwritten(model, folder, one_process, tmp_path):
    out = tmp_path / "captions.jsonl"
    command = caption(folder, "--model", model, "--batch-size", "1", "--json", out, "--quiet")
    stopped = start_then_stop(command, out, lambda process: process.send_signal(signal.SIGINT))
    assert stopped.returncode == 130 and not out.exists()
    partial = out.with_name("captions.jsonl.partial")
    kept = partial.read_text()
    assert 3 <= len(kept.splitlines()) < 30

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # without --resume: refused, nothing lost
    assert again.returncode != 0 and "pass --resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert partial.read_text() == kept

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # broken.jpg, tried again
    assert f"{len(kept.splitlines())} of 31 images are in {out} already" in resumed.stderr
    assert len(resumed.stdout.splitlines()) == 30 - len(kept.splitlines())  # only what was missing was captioned
    assert captions(records(out)) == captions(one_process) and not partial.exists()

    nothing_left = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert nothing_left.stdout == "" and captions(records(out)) == captions(one_process)


def test_two_torchrun_processes_give_what_one_process_gives(model, folder, one_process, tmp_path):
    out = tmp_path / "captions.jsonl"
    done = subprocess.run(caption(folder, "--model", model, "--json", out, "--quiet", torchrun=True), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "broken.jpg" in done.stderr  # the rank that had it says so
    assert captions(records(out)) == captions(one_process)  # the same captions, in input order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl"]  # the part files are gone
    refused = subprocess.run(caption(folder, "--model", model, "--quiet", torchrun=True), capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "under torchrun, give --json FILE" in refused.stderr


def test_a_killed_rank_is_resumed_with_nothing_lost_and_nothing_captioned_twice(model, folder, one_process, tmp_path):
    out = tmp_path / "captions.jsonl"
    command = caption(folder, "--model", model, "--batch-size", "1", "--json", out, "--quiet", torchrun=True)

    def kill_a_rank(process):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        subprocess.run(["kill", "-KILL", children[-1]], check=True)

    stopped = start_then_stop(command, out, kill_a_rank)
    assert stopped.returncode != 0 and not out.exists()
    before = {}
    for part in out.parent.glob("captions.jsonl.rank*-of-2.partial"):
        for line in part.read_text().splitlines():
            try:
                before[json.loads(line)["source"]] = json.loads(line)
            except ValueError:  # a line the kill cut short
                pass
    assert 3 <= len(before) < 30

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode != 0 and "broken.jpg" in resumed.stderr
    assert len(resumed.stdout.splitlines()) == 30 - len(before)  # nothing captioned twice
    final = records(out)
    assert captions(final) == captions(one_process)  # nothing lost, in input order
    assert all(record in final for record in before.values())  # what was made before the kill is what was kept


def test_a_wrong_torchrun_environment_is_one_line(model, folder, tmp_path):
    import os

    for env, says in (({"WORLD_SIZE": "two"}, "must be whole numbers"), ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be from 0 to WORLD_SIZE - 1")):
        done = subprocess.run(caption(folder, "--model", model, "--json", tmp_path / "out.jsonl"), capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
