"""Every number a user can give has a checked range: one line naming the setting, exit 2, before any work.

(The hostile-user pass found that beam 10000 grew to ~21 GB, `--set decoder_lr=inf` trained a model of
NaN weights, `image_size=100000` asked for 120 GB and `--limit -1` said "nothing to score".)
"""

from pathlib import Path

import pytest

from captioner.cli.main import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "dog.jpg")


@pytest.mark.parametrize(
    "command, fragment",
    [
        (["caption", EXAMPLE, "--beam", "10000"], "--beam must be a whole number from 1 to 100, not 10000"),
        (["caption", EXAMPLE, "--n-best", "5000"], "--n-best must be a whole number from 1 to 100"),
        (["caption", EXAMPLE, "--max-length", "100000"], "--max-length must be a whole number from 1 to 100"),
        (["caption", EXAMPLE, "--length-penalty", "nan"], "--length-penalty must be a number from 0 to 10, not nan"),
        (["caption", EXAMPLE, "--length-penalty", "-5"], "--length-penalty must be a number from 0 to 10"),
        (["caption", EXAMPLE, "--no-repeat-ngram", "11"], "--no-repeat-ngram must be a whole number from 0 to 10"),
        (["caption", EXAMPLE, "--batch-size", "100000"], "--batch-size must be a whole number from 1 to 4,096"),
        (["evaluate", "default", "--limit", "-1"], "--limit must be a whole number from 0"),
        (["evaluate", "default", "--beam", "3", "0"], "--beam must be a whole number from 1 to 100, not 0"),
        (["evaluate", "default", "--batch-size", "0"], "--batch-size must be"),
        (["evaluate", "default", "--familiar-percentile", "-1"], "--familiar-percentile must be a number from 0 to 100, not -1"),
        (["prepare", "x.csv", "--out", "o", "--min-word-freq", "0"], "--min-word-freq must be a whole number from 1"),
        (["prepare", "x.csv", "--out", "o", "--max-length", "0"], "--max-length must be a whole number from 1 to 1,000"),
        (["shapes", "out", "--num-images", "1000000000"], "--num-images must be a whole number from 3 to 1,000,000"),
        (["shapes", "out", "--image-size", "1000000"], "--image-size must be a whole number from 32 to 1,024"),
        (["train", "--data", "d", "--set", "decoder_lr=inf"], "decoder_lr must be a number above 0 and at most 1, not inf"),
        (["train", "--data", "d", "--set", "weight_decay=-1"], "weight_decay must be a number from 0 to 1"),
        (["train", "--data", "d", "--set", "encode_batch_size=0"], "encode_batch_size must be a whole number from 1"),
        (["train", "--data", "d", "--set", "workers=-1"], "workers must be a whole number from 0 to 64"),
        (["train", "--data", "d", "--set", "image_size=100000"], "image_size must be a whole number from 32 to 1,024"),
        (["train", "--data", "d", "--seed", "-1"], "seed must be a whole number from 0"),
        (["train", "--data", "d", "--set", "decoder.hidden_dim=1000000"], "decoder.hidden_dim must be a whole number from 1 to 8,192"),
        (["train", "--data", "d", "--set", "decoder.dropout=nan"], "decoder.dropout must be a number from 0 to 1"),
        (["train", "--data", "d", "--set", "val_beam_size=500"], "val_beam_size must be a whole number from 1 to 100"),
        (["train", "--data", "d", "--set", "epochs=\u0663"], "epochs must be an integer in ASCII digits"),
        (["ensemble", "default", "--flip", "--out", "e", "--length-penalty", "nan"], "--length-penalty must be a number from 0 to 10, not nan"),
    ],
)
def test_an_out_of_range_number_is_one_line_before_any_work(command, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    assert main(command) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and fragment in error and "internal error" not in error, error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"beam_size": 10000}, "beam_size must be a whole number from 1 to 100"),
        ({"n_best": 5000}, "n_best must be a whole number from 1 to 100"),
        ({"length_penalty": float("nan")}, "length_penalty must be a number from 0 to 10, not nan"),
        ({"length_penalty": -5}, "length_penalty must be a number from 0 to 10"),
        ({"max_length": 10_000_000}, "max_length must be a whole number from 1 to 100"),
        ({"temperature": float("inf"), "strategy": "sample"}, "temperature must be a number above 0"),
        ({"top_p": 0}, "top_p must be a number above 0"),
        ({"beam_size": True}, "beam_size must be a whole number"),
    ],
)
def test_the_python_api_checks_the_same_ranges(settings, fragment):
    from captioner.errors import ConfigError
    from captioner.models.captioner import Captioner

    model = Captioner.load("default")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        model.caption(EXAMPLE, **settings)
