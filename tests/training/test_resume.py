"""--resume restores everything: an interrupted run ends with the same weights as an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from captioner.errors import CaptionerError, CheckpointError
from captioner.training.loop import train
from conftest import shapes_train_config


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, attention", [("attention", "soft"), ("attention", "hard"), ("show_tell", "soft")])
def test_interrupted_and_resumed_equals_uninterrupted(shapes_prepared, tmp_path, kind, attention):
    # (hard attention: the readings drawn per batch, the regions sampled and the reward baseline resume too)
    settings = dict(epochs=3, decoder={"kind": kind, "attention": attention, "dropout": 0.3}, scheduled_sampling_start=1, schedule="step", lr_step_epochs=1, lr_gamma=0.7)
    train(shapes_train_config(shapes_prepared, tmp_path / "straight", **settings))
    # stop in the middle of epoch 2 (20 batches per epoch), then resume to the end
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", max_steps=27, **settings))
    state = json.loads((tmp_path / "broken" / "last" / "training_state.json").read_text())
    assert "step_in_epoch" in json.dumps(state)
    run = dict(state["__dict__"])["run"]
    baseline = dict(run["__dict__"])["hard_attention_baseline"]
    assert (baseline is not None and baseline < 0) == (attention == "hard")  # a mean log-likelihood, kept for the resumed run
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", **settings), resume=True)
    straight, resumed = weights(tmp_path / "straight" / "last"), weights(tmp_path / "broken" / "last")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert weights(tmp_path / "straight" / "best").keys() == weights(tmp_path / "broken" / "best").keys()
    lines = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_run_folder_rules(shapes_prepared, tmp_path):
    config = shapes_train_config(shapes_prepared, tmp_path / "run", epochs=1, max_steps=2)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config, resume=True)
    train(config)
    with pytest.raises(CaptionerError, match="already holds a run; pass --resume"):
        train(config)
    train(config, overwrite=True)
    assert (tmp_path / "run" / "last" / "training_state.safetensors").is_file()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(shapes_prepared, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    config = shapes_train_config(shapes_prepared, tmp_path / "home", epochs=1, max_steps=2)
    with pytest.raises(CaptionerError, match="is not a training run .*no train_config.json.*refusing"):
        train(config, overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_fine_tuning_from_images_in_worker_processes_resumes_exactly(shapes_prepared, tmp_path):
    # the encoder trains, so batches are decoded from images by 2 loader processes; resume mid-epoch
    # must still end with the straight run's weights (the loader never draws on the global RNG)
    settings = dict(epochs=1, fine_tune_encoder=1, workers=2, batch_size=32, val_max_images=4, decoder={"hidden_dim": 32, "embed_dim": 16, "attention_dim": 16})
    train(shapes_train_config(shapes_prepared, tmp_path / "straight", **settings))
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", max_steps=4, **settings))
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", **settings), resume=True)
    straight, resumed = weights(tmp_path / "straight" / "last"), weights(tmp_path / "broken" / "last")
    assert any(name.startswith("encoder.") for name in straight) and straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
