"""Training faults: killed mid-epoch or mid-checkpoint, a full disk, a loss that stops being finite.

In every case nothing done before the last complete checkpoint is lost, and ``--resume`` ends with
exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from captioner.cli.main import main
from captioner.training.loop import TrainingError, train
from captioner.training.state import load_state
from conftest import shapes_train_config

pytestmark = pytest.mark.slow
SETTINGS = dict(epochs=2, save_every_steps=6, decoder={"dropout": 0.3})  # 20 batches per epoch


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(shapes_prepared, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    train(shapes_train_config(shapes_prepared, out, **SETTINGS))
    return out


def run_killed(config, fault: str) -> subprocess.CompletedProcess:
    """Train in a child process that SIGKILLs itself at the ``fault``: a real kill, no clean-up runs."""
    driver = textwrap.dedent(
        f"""
        import json, os, signal, sys
        import captioner.models.checkpoint as checkpoint
        import captioner.training.loop as loop
        from captioner.training.config import TrainConfig

        fault = {fault!r}
        writes = [0]
        original_save = checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            writes[0] += 1
            if fault == "during-write" and writes[0] == 4:  # the 4th checkpoint: half a file, then death
                with open(path, "wb") as handle:
                    handle.write(b"\\x00" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(tensors, path, metadata=metadata)

        checkpoint.save_file = save_file
        steps = [0]
        original_forward = loop.TrainingStep.forward

        def forward(self, *args, **kwargs):
            if self.training:
                steps[0] += 1
                if fault == "mid-epoch" and steps[0] == 29:  # in epoch 2, 5 steps after the step-24 save
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_forward(self, *args, **kwargs)

        loop.TrainingStep.forward = forward
        import torch
        original_step = torch.optim.Adam.step

        def step(self, *args, **kwargs):
            result = original_step(self, *args, **kwargs)
            if fault == "ctrl-c-after-update" and steps[0] == 29:  # the weights moved; the counters not yet
                os.kill(os.getpid(), signal.SIGINT)
            return result

        torch.optim.Adam.step = step
        loop.train(TrainConfig.from_dict(json.loads(sys.argv[1])))
        """
    )
    return subprocess.run([sys.executable, "-c", driver, json.dumps(config.to_dict())], capture_output=True, text=True, timeout=600)


def test_ctrl_c_right_after_an_update_then_resume_equals_the_uninterrupted_run(shapes_prepared, straight, tmp_path):
    # Ctrl-C lands between the optimiser's update and the step counters: the interrupted run saves
    # last/ on the way out, and it must not claim one step fewer than its weights have taken
    config = shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS)
    interrupted = run_killed(config, "ctrl-c-after-update")
    assert interrupted.returncode != 0 and "KeyboardInterrupt" in interrupted.stderr, interrupted.stderr[-2000:]
    assert load_state(tmp_path / "run" / "last")["run"]["global_step"] == 29, "the interrupted step is counted"
    train(shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS), resume=True)
    assert_same_weights(straight / "last", tmp_path / "run" / "last")


@pytest.mark.parametrize("fault", ["mid-epoch", "during-write"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(shapes_prepared, straight, tmp_path, fault):
    config = shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS)
    killed = run_killed(config, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((tmp_path / "run" / "last" / "training_state.json").read_text())
    assert "global_step" in json.dumps(state)  # the last complete checkpoint is there and readable
    if fault == "during-write":
        assert list((tmp_path / "run").glob(".last.*.building")) or list((tmp_path / "run").glob(".best.*.building"))

    train(shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS), resume=True)
    assert_same_weights(straight / "last", tmp_path / "run" / "last")
    assert not list((tmp_path / "run").glob(".*.building")), "half-written checkpoints are cleared on resume"
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_continues(shapes_prepared, straight, tmp_path, monkeypatch, capsys):
    from captioner.models import checkpoint

    original = checkpoint.save_file
    writes = [0]

    def disk_fills_up(tensors, path, metadata=None):
        writes[0] += 1
        if writes[0] == 6:  # writes: steps 6, 12, 18, epoch 1's best and last, then step 24 in epoch 2
            raise OSError(28, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_up)
    config = shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS)
    settings_file = tmp_path / "run.json"
    settings_file.write_text(json.dumps(config.to_dict()))
    code = main(["train", "--config", str(settings_file), "--quiet"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    before = json.loads((tmp_path / "run" / "last" / "training_state.json").read_text())
    assert before  # the previous checkpoint is whole
    assert not list((tmp_path / "run").glob(".*.building"))

    monkeypatch.setattr(checkpoint, "save_file", original)  # space freed
    train(shapes_train_config(shapes_prepared, tmp_path / "run", **SETTINGS), resume=True)
    assert_same_weights(straight / "last", tmp_path / "run" / "last")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_non_finite_loss_is_skipped_or_stops_with_one_line(shapes_prepared, tmp_path, monkeypatch, policy):
    import torch.nn.functional as F

    original = F.cross_entropy
    calls = [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls[0] in (3, 4) else loss  # training steps 3 and 4 of epoch 1

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    config = shapes_train_config(shapes_prepared, tmp_path / "run", epochs=1, nan_policy=policy)
    if policy == "stop":
        with pytest.raises(TrainingError) as raised:
            train(config)
        message = str(raised.value)
        assert "\n" not in message and "epoch 1, step 3" in message and "nan" in message and "last" in message
        return
    state = train(config)
    assert state.skipped_steps == 2 and state.global_step == 20
    for name, tensor in weights(tmp_path / "run" / "last").items():
        assert torch.isfinite(tensor).all(), name
