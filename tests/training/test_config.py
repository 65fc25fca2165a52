from pathlib import Path

import pytest

from captioner.errors import ConfigError
from captioner.training.config import TrainConfig, apply_overrides, load_config_file


def test_toml_file_with_sections_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "data/f8k"\nepochs = 7\n[decoder]\nkind = "show_tell"\nhidden_dim = 256\n[encoder]\nbackbone = "efficientnet_lite0"\n')
    values = apply_overrides(load_config_file(path), ["decoder.hidden_dim=1024", "decoder_lr=1e-3", "word_vectors=none", "amp=off", "progress=false"])
    config = TrainConfig.from_dict(values)
    assert config.epochs == 7 and config.decoder.kind == "show_tell" and config.decoder.hidden_dim == 1024
    assert config.decoder_lr == 1e-3 and config.word_vectors is None and config.progress is False
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epochs=ten"], "epochs must be an integer"),
        (["epochs=2.5"], "epochs must be an integer"),
        (["decoder.kind=transformer"], "decoder kind"),
        (["learning_rate=1"], "unknown setting"),
        (["decoder.layers=2"], "unknown setting"),
        (["schedule=linear"], "schedule must be"),
        (["progress=maybe"], "must be true or false"),
        (["epochs"], "key=value"),
        (["label_smoothing=1.5"], "label_smoothing"),
        (["decoder.freeze_embeddings=true"], "freeze_embeddings .* needs word_vectors"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(apply_overrides({}, overrides))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)


def test_bf16_autocast_trains_on_the_cpu_and_fp16_is_refused(shapes_prepared, tmp_path):
    import json

    from captioner.training.loop import train
    from conftest import shapes_train_config

    train(shapes_train_config(shapes_prepared, tmp_path / "bf16", epochs=1, amp="bf16"))
    record = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["train_loss"] < 10 and record["val_CIDEr-D"] > 0
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(shapes_train_config(shapes_prepared, tmp_path / "fp16", epochs=1, amp="fp16"))


def test_train_command_smoke_run_and_resume_with_settings_equal_to_the_defaults(shapes_prepared, tmp_path):
    # a max_steps smoke run that stops before any validation succeeds (exit 0); on resume, a setting
    # given on the command line counts even when it equals the default (epochs 20, patience 5)
    import json

    from captioner.cli.main import main

    out = tmp_path / "run"
    small = ["--set", "decoder.hidden_dim=32", "--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16", "--set", "workers=0"]
    assert main(["train", "--data", str(shapes_prepared), "--out", str(out), "--epochs", "3", "--set", "patience=0", "--set", "max_steps=3", "--quiet", *small]) == 0
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 3
    assert main(["train", "--out", str(out), "--resume", "--epochs", "20", "--set", "patience=5", "--set", "max_steps=5", "--quiet"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["epochs"], saved["patience"], saved["decoder"]["hidden_dim"]) == (20, 5, 32)


def every_out_of_range_setting():
    from captioner.training.config import NUMBER_RANGES, WHOLE_NUMBER_RANGES

    for name, low, high in WHOLE_NUMBER_RANGES:
        yield name, str(low - 1)
        yield name, str(high + 1)
    for name, low, high, low_open in NUMBER_RANGES:
        yield from ((name, value) for value in (repr(low - 1.0), repr(high * 2 + 1), "nan", "inf"))
        if low_open:
            yield name, repr(low)  # the lowest itself is excluded


@pytest.mark.parametrize("name, value", list(every_out_of_range_setting()))
def test_every_numeric_setting_has_a_checked_range(name, value):
    from captioner.ranges import SettingError

    with pytest.raises(SettingError) as raised:
        TrainConfig.from_dict(apply_overrides({}, [f"{name}={value}"]))
    assert raised.value.setting == name and "\n" not in str(raised.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_config_is_a_valid_run(path):
    config = TrainConfig.from_dict(load_config_file(path))
    assert config.data and config.out.startswith(("runs/", "demo/"))
