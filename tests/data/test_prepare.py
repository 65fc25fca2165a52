"""captioner prepare, end to end on the generated shapes set."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from captioner.data import prepare as prepare_module
from captioner.data.formats import read_dataset
from captioner.data.prepare import PreparedDataset, PrepareOptions, prepare
from captioner.data.vocabulary import tokenize
from captioner.errors import CaptionerError, DatasetError


def _options(**overrides):
    return PrepareOptions(**{"min_word_freq": 1, "progress": False, **overrides})


def test_prepare_shapes_end_to_end(shapes_karpathy, tmp_path):
    dataset = read_dataset([shapes_karpathy])
    report = prepare(dataset, tmp_path / "prepared", _options())
    prepared = PreparedDataset(tmp_path / "prepared")
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["images.json", "prepared.json", "test.npz", "train.npz", "val.npz", "vocab.json"]
    assert report.counts["train"]["images"] == 48 and report.counts["val"]["images"] == 6 and report.counts["test"]["images"] == 6
    train = prepared.captions("train")
    assert train["tokens"].dtype == np.int32 and len(train["tokens"]) == report.counts["train"]["encoded"]
    # every encoded caption decodes back to one of its image's references
    for row in range(len(train["tokens"])):
        tokens, length, index = train["tokens"][row], train["lengths"][row], train["image_index"][row]
        assert tokens[0] == prepared.vocab.start_id and tokens[length - 1] == prepared.vocab.end_id
        assert (tokens[length:] == prepared.vocab.pad_id).all()
        assert prepared.vocab.decode(tokens) in [" ".join(tokenize(c)) for c in prepared.images[index]["captions"]]
        assert prepared.images[index]["split"] == "train"
    assert prepared.image_path(0).is_file()
    assert set(prepared.references("test")) == set(prepared.split_images("test"))
    meta = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
    assert meta["counts"]["train"]["captions"] == sum(len(prepared.images[i]["captions"]) for i in prepared.split_images("train"))


def test_vocabulary_comes_from_train_only(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text("image,caption,split\na.png,a dog,train\nb.png,a zebra,val\nc.png,a zebra,test\n")
    prepare(read_dataset([tmp_path / "captions.csv"]), tmp_path / "out", _options())
    prepared = PreparedDataset(tmp_path / "out")
    assert "zebra" not in prepared.vocab and "dog" in prepared.vocab
    assert prepared.vocab.decode(prepared.captions("val")["tokens"][0]) == "a <unk>"
    assert prepared.images[1]["captions"] == ["a zebra"]  # references stay raw


def test_bad_images_are_skipped_and_reported(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for name in ("good1.jpg", "good2.jpg", "good3.jpg"):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(images / name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("hello")
    Image.new("RGB", (64, 64)).save(images / "cut.png")
    (images / "cut.png").write_bytes((images / "cut.png").read_bytes()[:60])
    rows = ["good1.jpg,a cat,train", "good2.jpg,a dog,val", "good3.jpg,a cow,test", "empty.jpg,x,train", "text.jpg,y,train", "cut.png,z,train", "gone.jpg,w,train"]
    (tmp_path / "c.csv").write_text("image,caption,split\n" + "\n".join(rows) + "\n")
    report = prepare(read_dataset([tmp_path / "c.csv"], images), tmp_path / "out", _options())
    assert report.counts["train"]["images"] == 1
    assert report.dropped == {
        "missing image file": 1,
        "unreadable image: the file is empty": 1,
        "unreadable image: not an image, or a format Pillow cannot decode": 1,
        "unreadable image: truncated or corrupt": 1,
    }
    text = "\n".join(report.lines())
    assert "gone.jpg" in text and "text.jpg" in text
    # without verification only existence and size are checked
    report = prepare(read_dataset([tmp_path / "c.csv"], images), tmp_path / "out2", _options(verify_images=False))
    assert report.dropped == {"missing image file": 1, "empty image file": 1}


def test_long_and_wordless_captions(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "c.csv").write_text("image,caption,split\na.png,one two three four five six,train\na.png,one two,train\na.png,!!!,train\nb.png,one,val\n")
    report = prepare(read_dataset([tmp_path / "c.csv"]), tmp_path / "out", _options(max_length=5))
    assert report.counts["train"] == {"images": 1, "captions": 3, "encoded": 1}
    assert report.dropped == {"caption over 5 words (kept as a reference)": 1, "caption with no words (kept as a reference)": 1}
    assert "warning: split 'test' has no images" in "\n".join(report.lines())


def test_no_training_data_is_an_error(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption,split\nmissing.png,a cat,train\n")
    with pytest.raises(DatasetError, match="no training captions"):
        prepare(read_dataset([tmp_path / "c.csv"]), tmp_path / "out", _options())
    assert not (tmp_path / "out").exists()


def test_rerun_refuses_or_replaces_atomically(shapes_karpathy, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    dataset = read_dataset([shapes_karpathy])
    prepare(dataset, out, _options())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CaptionerError, match="already exists; pass --overwrite"):
        prepare(dataset, out, _options())

    # A crash in the middle of writing leaves the previous folder exactly as it was, and no debris.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(prepare_module, "_save_split", crash)
    with pytest.raises(RuntimeError):
        prepare(dataset, out, _options(overwrite=True, min_word_freq=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    monkeypatch.undo()

    prepare(dataset, out, _options(overwrite=True, min_word_freq=1000))
    assert len(PreparedDataset(out).vocab) == 4  # replaced: every word is now rare
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_prepared_dataset_errors(tmp_path, shapes_karpathy):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
    prepare(read_dataset([shapes_karpathy]), tmp_path / "p", _options())
    (tmp_path / "p" / "images.json").write_text("{broken")
    with pytest.raises(DatasetError, match="damaged"):
        PreparedDataset(tmp_path / "p")
    shutil.rmtree(tmp_path / "p")
    prepare(read_dataset([shapes_karpathy]), tmp_path / "p", _options())
    # valid JSON of the wrong shape, in the fields everything else reads: one line each, not a TypeError later
    meta, images = ((tmp_path / "p" / name).read_text() for name in ("prepared.json", "images.json"))
    entry = json.loads(images)[0]
    for name, text, message in [
        ("images.json", "[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
        ("images.json", json.dumps([None]), r"images.json entry 0 lacks its image file or split"),
        ("images.json", json.dumps([{**entry, "image": None}]), r"entry 0 lacks its image file"),
        ("images.json", json.dumps([{**entry, "captions": [5, None]}]), r"entry 0 \(.+\): its captions are not a list of text"),
        ("images.json", json.dumps({"a": 1}), r"images.json is not a list"),
        ("prepared.json", json.dumps({**json.loads(meta), "image_root": 5}), r"prepared.json has no image_root"),
        ("prepared.json", json.dumps({**json.loads(meta), "format": "1"}), r"format is not a whole number"),
    ]:
        (tmp_path / "p" / name).write_text(text)
        with pytest.raises(DatasetError, match=r"is damaged \(.*" + message):
            PreparedDataset(tmp_path / "p")
        (tmp_path / "p" / "prepared.json").write_text(meta)
        (tmp_path / "p" / "images.json").write_text(images)
    PreparedDataset(tmp_path / "p")  # restored: reads again
    (tmp_path / "p" / "val.npz").unlink()
    with pytest.raises(DatasetError, match="no val.npz"):
        PreparedDataset(tmp_path / "p").captions("val")


def test_overwrite_never_deletes_a_folder_that_is_not_a_prepared_one(shapes_karpathy, tmp_path):
    dataset = read_dataset([shapes_karpathy])
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CaptionerError, match="is not a prepared folder .*no prepared.json.*refusing"):
        prepare(dataset, mine, _options(overwrite=True))
    assert (mine / "notes.txt").read_text() == "keep me"
    # the caption file's own folder or the image folder as --out: refused, even when empty of ours
    for holds in (shapes_karpathy.parent, dataset.image_root, dataset.image_root.parent):
        with pytest.raises(CaptionerError, match="must be a folder of its own"):
            prepare(dataset, holds, _options(overwrite=True))
    assert shapes_karpathy.is_file() and any(dataset.image_root.iterdir())


def test_a_crash_between_the_two_renames_of_a_replace_is_recovered(shapes_karpathy, tmp_path):
    out = tmp_path / "prepared"
    prepare(read_dataset([shapes_karpathy]), out, _options())
    out.rename(tmp_path / ".prepared.old-4242")  # the old folder moved aside, the new one not yet in place
    assert len(PreparedDataset(out).vocab) > 4  # put back on reading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_an_evaluation_only_set_is_prepared_and_training_on_it_is_refused(tmp_path):
    import json

    from captioner.training.config import TrainConfig
    from captioner.training.data import load_dataset

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / name)
    lines = [{"image": "a.png", "captions": ["A red square.", "red"], "split": "test"}, {"image": "b.png", "captions": ["Red."], "split": "test"}]
    (tmp_path / "photos.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = prepare(read_dataset([tmp_path / "photos.jsonl"]), tmp_path / "out", _options())
    assert report.counts["test"]["images"] == 2 and report.counts["train"]["images"] == 0
    assert any("for evaluating models" in warning for warning in report.warnings)
    prepared = PreparedDataset(tmp_path / "out")
    assert prepared.meta["evaluation_only"] is True and len(prepared.vocab) == 4
    assert prepared.references("test")[prepared.split_images("test")[0]] == ["A red square.", "red"]
    with pytest.raises(CaptionerError, match="has no training images"):
        load_dataset(TrainConfig(data=str(tmp_path / "out")))
