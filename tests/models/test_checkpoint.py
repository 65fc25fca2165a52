"""Checkpoints: round trip, mismatches refused, hostile and damaged files refused, nothing unpickled."""

import json
import pickle
import shutil

import pytest
import torch
from conftest import make_model, make_vocab

from captioner.errors import CaptionerError, CheckpointError
from captioner.models.captioner import Captioner


def outputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 4, model.decoder.feature_dim, generator=generator)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    lengths = torch.tensor([4, 3])
    with torch.no_grad():
        return model.decoder(features, captions, lengths)[0]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind):
    model = make_model(kind, pretrained=True)
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    loaded = Captioner.load(tmp_path / "ckpt")
    assert torch.equal(outputs(model), outputs(loaded))
    assert loaded.vocab.words == model.vocab.words and not loaded.training
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    # a pretrained, frozen encoder is rebuilt from the installed package, not copied into the checkpoint
    assert config["encoder_weights"] == "package" and config["vocab_size"] == len(model.vocab)
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as stored:
        assert all(name.startswith("decoder.") for name in stored.keys())
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o044  # readable by others, like any file
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.encode(images), loaded.encode(images))
    # the model.safetensors path itself is accepted too
    assert torch.equal(outputs(Captioner.load(tmp_path / "ckpt" / "model.safetensors")), outputs(model))


def test_a_models_own_decoding_settings_are_stored_and_used_unless_a_call_says_otherwise(tmp_path):
    from PIL import Image

    model = make_model("attention", pretrained=True)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    plain = model.caption(image, beam_size=3, max_length=12)
    config = json.loads(model.save(tmp_path / "plain").joinpath("config.json").read_text())
    assert "length_penalty" not in config and "no_repeat_ngram_size" not in config  # a plain checkpoint stays as older versions wrote it
    model.config.length_penalty, model.config.no_repeat_ngram_size = 1.5, 1
    loaded = Captioner.load(model.save(tmp_path / "ckpt"))
    assert loaded.config.decoding_defaults() == {"length_penalty": 1.5, "no_repeat_ngram_size": 1, "early_stopping": "exact", "block_bad_endings": False, "block_doubled_words": False,
                                                  "concept_constraints": 0, "concept_threshold": 0.5, "concept_exclusion": 0.0, "concept_known_words": 0,
                                                  "concept_familiar_percentile": 0.0}
    mine = loaded.caption(image, beam_size=3, max_length=12)
    told = loaded.caption(image, beam_size=3, max_length=12, length_penalty=1.5, no_repeat_ngram_size=1)
    # scores agree to float rounding: on a loaded machine two calls may get different thread counts
    # (captioner.threads), and with them another summation order
    assert mine.text == told.text and mine.score == pytest.approx(told.score, rel=1e-6) and mine.score != pytest.approx(mine.log_prob)
    assert len(set(mine.words)) == len(mine.words)  # no word twice: the model's own no-repeat rule
    untold = loaded.caption(image, beam_size=3, max_length=12, length_penalty=0.0, no_repeat_ngram_size=0)
    assert untold.text == plain.text and untold.score == pytest.approx(plain.score, rel=1e-6) and untold.score == pytest.approx(untold.log_prob)


def test_half_precision_checkpoint_is_smaller_and_close(tmp_path):
    model = make_model("attention")
    model.save(tmp_path / "full")
    model.save(tmp_path / "half", precision="float16")
    full, half = (tmp_path / "full" / "model.safetensors").stat().st_size, (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half < 0.6 * full
    assert torch.allclose(outputs(Captioner.load(tmp_path / "half")), outputs(model), atol=1e-2)


def test_int8_checkpoint_is_a_quarter_and_close(tmp_path):
    model = make_model("attention", pretrained=True, embed_dim=64, hidden_dim=96, attention_dim=32)
    model.save(tmp_path / "full")
    model.save(tmp_path / "int8", precision="int8")
    full, small = (tmp_path / "full" / "model.safetensors").stat().st_size, (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert small < 0.3 * full
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["format"] == 2  # older readers refuse it with one line
    loaded = Captioner.load(tmp_path / "int8")
    for name, weight in model.decoder.state_dict().items():  # each weight within half a quantisation step of its row
        restored = loaded.decoder.state_dict()[name]
        step = weight.abs().amax(dim=1, keepdim=True) / 127 if weight.dim() == 2 else weight.abs().max() / 1000
        assert ((restored - weight).abs() <= step / 2 + 1e-6).all(), name
    assert torch.allclose(outputs(loaded), outputs(model), atol=5e-2)
    with pytest.raises(CaptionerError, match="precision must be one of"):
        model.save(tmp_path / "x", precision="int4")


def test_a_damaged_int8_checkpoint_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    make_model("attention", pretrained=True).save(tmp_path / "int8", precision="int8")
    weights = tmp_path / "int8" / "model.safetensors"
    tensors = load_file(str(weights))
    scale = next(name for name in tensors if name.endswith(".int8_scale"))
    save_file({name: tensor for name, tensor in tensors.items() if name != scale}, str(weights))
    with pytest.raises(CheckpointError, match="has no .int8_scale"):
        Captioner.load(tmp_path / "int8")
    tensors[scale] = tensors[scale][:-1]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="does not match an int8 matrix"):
        Captioner.load(tmp_path / "int8")


def test_fine_tuned_or_random_encoder_is_stored(tmp_path):
    random_encoder = make_model("attention")
    random_encoder.save(tmp_path / "random")
    assert json.loads((tmp_path / "random" / "config.json").read_text())["encoder_weights"] == "checkpoint"
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(random_encoder.encode(images), Captioner.load(tmp_path / "random").encode(images))
    model = make_model("attention", pretrained=True)
    model.fine_tune_encoder(1)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.5)
    model.save(tmp_path / "ckpt")
    loaded = Captioner.load(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.encoder.state_dict().items(), loaded.encoder.state_dict().items()):
        assert torch.equal(a, b), name


def test_mismatched_vocabulary_is_refused(tmp_path):
    make_model("attention").save(tmp_path / "ckpt")
    make_vocab(("a", "b", "c", "d")).save(tmp_path / "ckpt" / "vocab.json")
    with pytest.raises(CheckpointError, match="config.json says 7 words but vocab.json has 8"):
        Captioner.load(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["vocab_size"] = 8
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match its config or vocabulary: decoder\.embedding\.weight has shape \(7, 16\), expected \(8, 16\)"):
        Captioner.load(tmp_path / "ckpt")


def test_mismatched_config_is_refused(tmp_path):
    make_model("attention").save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["decoder"]["hidden_dim"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        Captioner.load(tmp_path / "ckpt")
    config["decoder"]["hidden_dim"] = 24
    config["decoder"]["kind"] = "show_tell"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing .* tensor"):
        Captioner.load(tmp_path / "ckpt")


class Canary:
    """Unpickling this object writes a file: proof that code ran."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["model.safetensors", "model.pt"])
def test_a_pickle_is_refused_and_nothing_runs(tmp_path, where):
    model = make_model("attention")
    model.save(tmp_path / "ckpt")
    canary = tmp_path / "canary"
    Canary.path = str(canary)
    payload = pickle.dumps({"state_dict": Canary()})
    assert not canary.exists()
    if where == "model.safetensors":
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(payload)
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            Captioner.load(tmp_path / "ckpt")
    else:
        torch.save({"state_dict": Canary()}, tmp_path / "model.pt")
        with pytest.raises(CheckpointError, match="refusing to load .*model.pt.*never loaded"):
            Captioner.load(tmp_path / "model.pt")
    assert not canary.exists()


def test_truncated_weights_missing_files_and_newer_format(tmp_path):
    make_model("attention").save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Captioner.load(tmp_path / "ckpt")
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        Captioner.load(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Captioner.load(tmp_path / "nowhere")
    make_model("attention").save(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    config["format"] = 99
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format 99, newer than this captioner reads"):
        Captioner.load(tmp_path / "new")
    (tmp_path / "new" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Captioner.load(tmp_path / "new")
    shutil.rmtree(tmp_path / "new")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (lambda c: json.dumps(c).replace('"max_length": 30', '"max_length": ' + "9" * 5000), "not valid JSON"),
        (lambda c: json.dumps({**c, "format": True}), "newer than this captioner reads"),
        (lambda c: json.dumps({**c, "encoder": "efficientnet_lite0"}), "'encoder' must be an object"),
        (lambda c: json.dumps({**c, "decoder": [1, 2]}), "'decoder' must be an object"),
        (lambda c: json.dumps({**c, "max_length": -5}), "max_length must be a whole number from 1 to 100, not -5"),
        (lambda c: json.dumps({**c, "length_penalty": "long"}), "length_penalty must be a number from 0 to 10"),
        (lambda c: json.dumps({**c, "no_repeat_ngram_size": 2.5}), "no_repeat_ngram_size must be a whole number from 0 to 10"),
        (lambda c: json.dumps({**c, "preprocessing": {**c["preprocessing"], "mean": [0.5]}}), "one value per RGB channel"),
        # hostile sizes and values: refused from the config alone, before anything of their size is made
        (lambda c: json.dumps({**c, "max_length": 10_000_000}), "max_length must be a whole number from 1 to 100, not 10000000"),
        (lambda c: json.dumps({**c, "vocab_size": 10_000_000}), "vocab_size must be a whole number from 4 to 1,000,000"),
        (lambda c: json.dumps({**c, "decoder": {**c["decoder"], "hidden_dim": 10**6}}), "hidden_dim must be a whole number from 1 to 8,192"),
        (lambda c: json.dumps({**c, "decoder": {**c["decoder"], "hidden_dim": 8192}}), r"does not match its config or vocabulary: .* expected"),
        (lambda c: json.dumps({**c, "preprocessing": {**c["preprocessing"], "image_size": 100_000}}), "image_size must be a whole number from 16 to 1,024"),
        (lambda c: json.dumps({**c, "preprocessing": {**c["preprocessing"], "crop_padding": -10**6}}), "crop_padding must be a whole number from 0"),
        (lambda c: json.dumps({**c, "preprocessing": {**c["preprocessing"], "mean": ["nan", 0.5, 0.5]}}), "mean must be a number from 0 to 1, not 'nan'"),
        (lambda c: json.dumps({**c, "preprocessing": {**c["preprocessing"], "std": [1e-300, 0.5, 0.5]}}), "std must be a number from 0.01 to 10"),
        (lambda c: json.dumps({**c, "decoder": {**c["decoder"], "dropout": float("nan")}}), "dropout must be a number from 0 to 1"),
        (lambda c: json.dumps({**c, "length_penalty": float("inf")}), "length_penalty must be a number from 0 to 10"),
        (lambda c: json.dumps(c) + " " * 1_000_001, "over the 1,000,000-byte limit"),
    ],
)
def test_hostile_or_wrong_config_is_one_line(tmp_path, change, message):
    make_model("attention").save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.setdefault("preprocessing", {"image_size": 224, "resize": "squash", "crop_padding": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    (tmp_path / "ckpt" / "config.json").write_text(change(config))
    with pytest.raises(CaptionerError, match=message) as error:
        Captioner.load(tmp_path / "ckpt")
    assert "\n" not in str(error.value)


def test_a_huge_or_lying_safetensors_header_is_refused_before_it_is_read(tmp_path):
    import struct
    import time

    make_model("attention").save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 80_000_000) + b"{" + b" " * 1000)  # claims an 80 MB header
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="header of 80,000,000 bytes, over the 16,000,000-byte limit"):
        Captioner.load(tmp_path / "ckpt")
    assert time.perf_counter() - start < 5
    header = json.dumps({"decoder.embedding.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)  # a tensor the file cannot hold
    with pytest.raises(CheckpointError, match="does not fit the file"):
        Captioner.load(tmp_path / "ckpt")


def test_weights_that_are_not_all_finite_are_refused_at_save_and_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model("attention")
    model.save(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    tensors["decoder.classifier.bias"][1] = float("inf")
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.classifier\.bias holds NaN or infinite values"):
        Captioner.load(tmp_path / "ckpt")
    with torch.no_grad():
        model.decoder.init_h.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving .*decoder\.init_h\.weight holds NaN or infinite values"):
        model.save(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_saving_over_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    from captioner.models import checkpoint

    first = make_model("attention", seed=1)
    first.save(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        make_model("attention", seed=2).save(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(outputs(Captioner.load(tmp_path / "ckpt")), outputs(first))


def test_a_crash_between_the_two_renames_of_a_save_is_recovered(tmp_path):
    model = make_model("attention", seed=1)
    model.save(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-4242")
    assert torch.equal(outputs(Captioner.load(tmp_path / "ckpt")), outputs(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saving_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(CaptionerError, match="is not a checkpoint .*refusing"):
        make_model("attention", seed=1).save(tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"


def test_default_model_message_when_none_ships(tmp_path, monkeypatch):
    from captioner.models import captioner as module

    monkeypatch.setattr(module, "DEFAULT_MODEL_DIR", tmp_path / "missing")  # a build without the shipped model
    with pytest.raises(CheckpointError, match="no default model ships"):
        Captioner.load("default")
