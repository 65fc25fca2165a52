"""Language pretraining (training/language.py): text alone teaches the decoder, evaluation captions
never reach it, and a run that starts with it still resumes exactly."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from captioner.data.prepare import PreparedDataset
from captioner.errors import ConfigError
from captioner.ranges import SettingError
from captioner.training.language import LanguageText, blank_image_loss, pretrain_language
from captioner.training.loop import build_model, train
from conftest import shapes_train_config


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def training_captions(dataset):
    return [caption for captions in dataset.references("train").values() for caption in captions]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_text_alone_teaches_the_decoder_the_captions_language(shapes_prepared, tmp_path, kind):
    dataset = PreparedDataset(shapes_prepared)
    text = write_lines(tmp_path / "text.txt", training_captions(dataset))
    config = shapes_train_config(shapes_prepared, tmp_path / "run", decoder={"kind": kind}, language_text=str(text), language_epochs=2, language_batch_size=64)
    torch.manual_seed(0)
    model = build_model(config, dataset)
    encoder_before = {name: value.clone() for name, value in model.encoder.state_dict().items()}
    before = blank_image_loss(model, dataset, "val", torch.device("cpu"))
    lines = []
    pretrain_language(model, config, dataset, torch.device("cpu"), lines.append)
    after = blank_image_loss(model, dataset, "val", torch.device("cpu"))
    # The shapes captions' language ("a red circle in the top left"): from about log(vocabulary) down
    # towards what text alone can know (the shapes, colours and places are random: 3.25 -> 2.47 here).
    assert before > 3.0 and after < 0.8 * before, (before, after)
    assert all(torch.equal(value, encoder_before[name]) for name, value in model.encoder.state_dict().items())
    # (the shapes set's sentences repeat: a third of its training captions are also validation or test captions, left out)
    assert re.match(r"language pretraining on [\d,]+ sentences of .* \([\d,]+ left out as validation or test captions of prepared\)$", lines[0]), lines[0]
    assert sum("language epoch" in line for line in lines) == 2


def test_validation_and_test_captions_are_left_out(shapes_prepared, tmp_path):
    dataset = PreparedDataset(shapes_prepared)
    held_out = [captions[0] for split in ("val", "test") for captions in dataset.references(split).values()]
    fresh = "a purple hexagon juggling three oranges"
    text = write_lines(tmp_path / "text.txt", [held_out[0].upper() + " !", fresh, "", held_out[-1], " ".join(["word"] * 51)])
    read = LanguageText.read_file(text, dataset.vocab, held_out)
    assert (len(read), read.read, read.evaluation_captions, read.too_long) == (1, 4, 2, 1)  # the same words, other case and punctuation, still count
    assert read.tokens[0, : int(read.lengths[0])].tolist() == dataset.vocab.encode(fresh)
    only_held_out = write_lines(tmp_path / "held_out.txt", held_out[:3])
    with pytest.raises(ConfigError, match="no sentences to learn from .3 read, 3 of them evaluation captions"):
        LanguageText.read_file(only_held_out, dataset.vocab, held_out)


def test_unreadable_text_is_one_clear_error(shapes_prepared, tmp_path):
    vocab = PreparedDataset(shapes_prepared).vocab
    with pytest.raises(ConfigError, match="does not exist"):
        LanguageText.read_file(tmp_path / "missing.txt", vocab, [])
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 by the sea\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        LanguageText.read_file(tmp_path / "latin1.txt", vocab, [])
    for setting, value in [("language_epochs", 0), ("language_batch_size", 0), ("language_epochs", 1001)]:
        with pytest.raises(SettingError, match=setting):
            shapes_train_config(shapes_prepared, tmp_path / "run", **{setting: value})


@pytest.mark.slow
def test_a_run_that_starts_with_language_pretraining_resumes_exactly(shapes_prepared, tmp_path, capsys):
    dataset = PreparedDataset(shapes_prepared)
    text = write_lines(tmp_path / "text.txt", training_captions(dataset)[:300])
    settings = dict(epochs=1, language_text=str(text), language_epochs=1, language_batch_size=32, decoder={"dropout": 0.3})
    train(shapes_train_config(shapes_prepared, tmp_path / "straight", **settings))
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", max_steps=7, **settings))  # stops in the middle of the epoch (20 batches)
    capsys.readouterr()
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", **settings), resume=True)
    assert "language pretraining" not in capsys.readouterr().out  # the resumed run starts from its checkpoint, after the phase
    straight, resumed = (load_file(str(tmp_path / run / "last" / "model.safetensors")) for run in ("straight", "broken"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[name], resumed[name]) for name in straight)
    saved = json.loads((tmp_path / "straight" / "train_config.json").read_text())
    assert saved["language_text"] == str(text.resolve())
