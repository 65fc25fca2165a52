"""One writer per folder: train, prepare, evaluate and ensemble refuse a folder another process is writing."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from captioner.cli.main import main
from captioner.locking import FolderInUse, exclusive_writer, lock_path


def hold_in_child(folder):
    """A child process that holds ``folder``'s lock until killed; returns it once it holds it."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from captioner.locking import exclusive_writer
        with exclusive_writer({str(folder)!r}):
            print("holding", flush=True)
            time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "holding"
    return child


def test_a_second_writer_is_refused_with_the_holders_pid_and_the_lock_goes_with_the_process(tmp_path):
    folder = tmp_path / "run"
    child = hold_in_child(folder)
    try:
        with pytest.raises(FolderInUse, match=f"{folder} is being written by another captioner process \\(PID {child.pid}\\)"):
            with exclusive_writer(folder):
                pass
    finally:
        child.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        child.wait()
    assert lock_path(folder).exists()  # what the killed process left is a file, not a lock
    with exclusive_writer(folder):
        assert lock_path(folder).read_text().strip() == str(os.getpid())
    assert not lock_path(folder).exists()  # removed by the writer that finishes


def test_within_one_process_too(tmp_path):
    with exclusive_writer(tmp_path / "x"):
        with pytest.raises(FolderInUse):
            with exclusive_writer(tmp_path / "x"):
                pass
        with exclusive_writer(tmp_path / "y"):  # another folder is another lock
            pass


def test_prepare_train_evaluate_and_ensemble_refuse_a_folder_in_use(shapes_karpathy, shapes_prepared, tmp_path, capsys):
    from captioner.training.loop import train
    from conftest import shapes_train_config

    out = tmp_path / "busy"
    child = hold_in_child(out)
    try:
        commands = [
            ["prepare", str(shapes_karpathy), "--out", str(out), "--min-word-freq", "1", "--quiet"],
            ["train", "--data", str(shapes_prepared), "--out", str(out), "--quiet", "--set", "max_steps=1"],
            ["ensemble", "default", "--flip", "--out", str(out)],
        ]
        for command in commands:
            assert main(command) == 2, command
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and f"PID {child.pid}" in error, (command, error)
        with pytest.raises(FolderInUse):
            train(shapes_train_config(shapes_prepared, out, epochs=1, max_steps=1))
        assert not out.exists()  # nothing was written
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_two_trainings_started_together_one_refuses(shapes_prepared, tmp_path):
    # the scenario that used to interleave metrics.jsonl and leave one run's best/ in the other's folder
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "captioner", "train", "--data", str(shapes_prepared), "--out", str(out), "--quiet", "--epochs", "2",
        "--set", "workers=0", "--set", "decoder.hidden_dim=32", "--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16",
        "--set", "val_beam_size=1", "--set", "val_max_images=4",
    ]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    _, first_errors = first.communicate(timeout=600)
    assert first.returncode == 0, first_errors
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one run's two epochs, not four
