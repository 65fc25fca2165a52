"""Every input format, parsed from small files the tests write themselves."""

import json

import pytest

from captioner.data.formats import ReadOptions, detect_format, read_dataset
from captioner.data.records import hash_split
from captioner.errors import DatasetError


def _karpathy(tmp_path, images):
    path = tmp_path / "dataset_test.json"
    path.write_text(json.dumps({"dataset": "test", "images": images}))
    return path


def _entry(name, split, *captions, **extra):
    return {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions], **extra}


def test_karpathy(tmp_path):
    path = _karpathy(
        tmp_path,
        [
            _entry("a.jpg", "train", "A dog.", "A brown dog"),
            _entry("b.jpg", "val", "A cat"),
            _entry("c.jpg", "test", "A bird", " "),
            _entry("d.jpg", "restval", "A fish", filepath="val2014", cocoid=42),
        ],
    )
    assert detect_format(path) == "karpathy"
    dataset = read_dataset([path])
    by_image = {r.image: r for r in dataset.records}
    assert by_image["a.jpg"].captions == ["A dog.", "A brown dog"] and by_image["a.jpg"].split == "train"
    assert by_image["b.jpg"].split == "val"
    assert by_image["c.jpg"].captions == ["A bird"]  # whitespace-only caption dropped
    assert dataset.dropped["empty caption"] == 1
    assert by_image["val2014/d.jpg"].split == "train" and by_image["val2014/d.jpg"].image_id == "42"
    assert dataset.image_root == tmp_path


def test_karpathy_restval_choices(tmp_path):
    path = _karpathy(tmp_path, [_entry("a.jpg", "train", "x"), _entry("d.jpg", "restval", "y")])
    assert {r.image for r in read_dataset([path], options=ReadOptions(restval="drop")).records} == {"a.jpg"}
    assert read_dataset([path], options=ReadOptions(restval="val")).records[1].split == "val"


def test_karpathy_tokens_only_and_missing_keys(tmp_path):
    path = _karpathy(tmp_path, [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": ["a", "dog"]}]}])
    assert read_dataset([path]).records[0].captions == ["a dog"]
    path = _karpathy(tmp_path, [{"split": "train", "sentences": []}])
    with pytest.raises(DatasetError, match=r"images\[0\] has no 'filename'"):
        read_dataset([path])


def test_coco_annotations_with_split_folders(tmp_path):
    (tmp_path / "train2014").mkdir()
    data = {
        "images": [{"id": 1, "file_name": "COCO_train2014_1.jpg"}, {"id": 2, "file_name": "COCO_train2014_2.jpg"}, {"id": 2, "file_name": "dup.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man riding a horse."},
            {"id": 11, "image_id": 1, "caption": "Someone on a horse\n"},
            {"id": 12, "image_id": 2, "caption": "A plate of food"},
            {"id": 13, "image_id": 99, "caption": "orphan"},
        ],
    }
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    assert detect_format(path) == "coco"
    dataset = read_dataset([path], tmp_path)
    records = {r.image_id: r for r in dataset.records}
    assert records["1"].image == "train2014/COCO_train2014_1.jpg"
    assert records["1"].captions == ["A man riding a horse.", "Someone on a horse"]
    assert records["1"].split == "train"
    assert dataset.dropped == {"duplicate image id": 1, "caption of an unknown image id": 1}


def test_coco_split_from_option_or_refused(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(DatasetError, match="--split"):
        read_dataset([path])
    assert read_dataset([path], options=ReadOptions(split="test")).records[0].split == "test"


FLICKR_TOKENS = (
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs .\n"
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
    "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    "1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint\n"
    "2258277193_586949ec62.jpg.1#0\tstray id with no image\n"
)


def _flickr8k(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(FLICKR_TOKENS)
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1000268201_693b08cb0e.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("1001773457_577c3a7d70.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("1002674143_1b742ab4b8.jpg\n")
    return tmp_path / "Flickr8k.token.txt"


def test_flickr8k_token_file_with_split_lists_beside_it(tmp_path):
    path = _flickr8k(tmp_path)
    assert detect_format(path) == "flickr8k"
    dataset = read_dataset([path])
    splits = {r.image: r.split for r in dataset.records}
    assert splits == {"1000268201_693b08cb0e.jpg": "train", "1001773457_577c3a7d70.jpg": "val", "1002674143_1b742ab4b8.jpg": "test"}
    assert dataset.records[0].captions[1] == "A girl going into a wooden building ."
    assert dataset.dropped == {"image in no split list": 1}


def test_flickr_style_token_file_without_lists_gets_hash_split(tmp_path):
    path = tmp_path / "results_20130124.token"
    path.write_text(FLICKR_TOKENS)
    dataset = read_dataset([path])
    assert len(dataset.records) == 4
    assert all(r.split == hash_split(r.image, (0.9, 0.05, 0.05)) for r in dataset.records)


def test_kaggle_captions_txt_with_official_lists(tmp_path):
    _flickr8k(tmp_path)
    path = tmp_path / "captions.txt"
    path.write_text(
        "image,caption\n"
        "1000268201_693b08cb0e.jpg,\"A child in a pink dress, climbing stairs .\"\n"
        "1000268201_693b08cb0e.jpg,A girl going into a wooden building .\n"
        "1001773457_577c3a7d70.jpg,A black dog and a spotted dog are fighting\n"
    )
    assert detect_format(path) == "csv"
    lists = sorted(tmp_path.glob("Flickr_8k.*Images.txt"))
    dataset = read_dataset([path, *lists])
    records = {r.image: r for r in dataset.records}
    assert records["1000268201_693b08cb0e.jpg"].captions[0] == "A child in a pink dress, climbing stairs ."
    assert records["1000268201_693b08cb0e.jpg"].split == "train" and records["1001773457_577c3a7d70.jpg"].split == "val"


def test_flickr30k_pipe_separated_results_csv(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("image_name| comment_number| comment\n1000092795.jpg| 0| Two young guys with shaggy hair .\n1000092795.jpg| 1| Two friends enjoy time outside .\n")
    dataset = read_dataset([path])
    assert dataset.records[0].image == "1000092795.jpg"
    assert dataset.records[0].captions == ["Two young guys with shaggy hair .", "Two friends enjoy time outside ."]


def test_generic_csv_with_and_without_split(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("image,caption,split\nshoe.jpg,a red running shoe,train\nshoe.jpg,a sneaker,train\nbag.jpg,a leather bag,validation\n")
    records = {r.image: r for r in read_dataset([path]).records}
    assert records["shoe.jpg"].captions == ["a red running shoe", "a sneaker"]
    assert records["bag.jpg"].split == "val"
    path.write_text("image,caption\n" + "".join(f"img{i}.jpg,caption {i}\n" for i in range(400)))
    first = [r.split for r in read_dataset([path]).records]
    second = [r.split for r in read_dataset([path]).records]
    assert first == second  # deterministic
    assert 300 < first.count("train") < 400 and first.count("val") > 5 and first.count("test") > 5
    custom = [r.split for r in read_dataset([path], options=ReadOptions(split_fractions=(0.5, 0.5, 0.0))).records]
    assert "test" not in custom and 150 < custom.count("train") < 250


def test_csv_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("picture,words\na.jpg,hello\n")
    with pytest.raises(DatasetError, match="no image column"):
        read_dataset([path])
    path.write_text("image,caption,split\na.jpg,x,train\na.jpg,y,test\n")
    with pytest.raises(DatasetError, match="two splits"):
        read_dataset([path])
    path.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        read_dataset([path])


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"image": "a.jpg", "captions": ["one", "two"], "split": "train"}) + "\n\n"
        + json.dumps({"image": "b.jpg", "caption": "three", "split": "test"}) + "\n"
        + json.dumps({"image": "a.jpg", "caption": "four", "split": "train"}) + "\n"
    )
    assert detect_format(path) == "jsonl"
    records = {r.image: r for r in read_dataset([path]).records}
    assert records["a.jpg"].captions == ["one", "two", "four"] and records["b.jpg"].split == "test"
    path.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "capt\n')
    with pytest.raises(DatasetError, match=r"data.jsonl:2: not valid JSON"):
        read_dataset([path])


def test_malformed_and_truncated_json(tmp_path):
    path = tmp_path / "dataset_x.json"
    path.write_text('{"images": [{"filename": "a.jpg", "sentences": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset([path], format="karpathy")
    path.write_text('{"something": 1}')
    with pytest.raises(DatasetError, match="cannot tell the format"):
        read_dataset([path])


def test_non_utf8_bytes_are_replaced_and_reported(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"image,caption\na.jpg,a caf\xe9 table\nb.jpg,fine\n")
    dataset = read_dataset([path])
    assert dataset.records[0].captions == ["a caf\ufffd table"]
    assert "not UTF-8" in dataset.warnings[0]


def test_missing_file_folder_and_no_usable_captions(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset([tmp_path / "nope.json"])
    with pytest.raises(DatasetError, match="is a folder"):
        read_dataset([tmp_path])
    path = tmp_path / "captions.csv"
    path.write_text("image,caption\na.jpg,  \n")
    with pytest.raises(DatasetError, match="no usable captions"):
        read_dataset([path])


def test_duplicate_karpathy_entries(tmp_path):
    path = _karpathy(tmp_path, [_entry("a.jpg", "train", "x"), _entry("a.jpg", "train", "y", "x"), _entry("a.jpg", "test", "z")])
    dataset = read_dataset([path])
    assert len(dataset.records) == 1 and dataset.records[0].captions == ["x", "y"]
    assert dataset.dropped["image repeated in another split (kept the first)"] == 1


@pytest.mark.parametrize("format", ["karpathy", "coco", "flickr8k", "csv", "jsonl"])
def test_synthetic_set_reads_the_same_in_every_format(tmp_path, format):
    from captioner.data.synthetic import write_shapes_dataset

    sources = write_shapes_dataset(tmp_path, num_images=20, seed=1, format=format)
    assert len(sources) == (3 if format == "coco" else 1)
    dataset = read_dataset(sources)
    assert dataset.format == format
    summary = sorted((r.image.split("/")[-1], r.split, tuple(r.captions)) for r in dataset.records)
    reference = json.loads((tmp_path / "shapes.json").read_text())
    assert summary == sorted((item["image"], item["split"], tuple(item["captions"])) for item in reference)


@pytest.mark.parametrize("num_images", [3, 4, 5, 8])
def test_synthetic_set_has_every_split_however_small(tmp_path, num_images):
    from captioner.data.synthetic import write_shapes_dataset

    sources = write_shapes_dataset(tmp_path, num_images=num_images, seed=2, image_size=32)
    assert sorted(read_dataset(sources).counts()) == ["test", "train", "val"]


def test_a_caption_file_that_is_a_pipe_or_a_device_is_refused(tmp_path):
    # /dev/zero or an endless pipe used to be read into memory until the machine ran out of it
    import os

    pipe = tmp_path / "captions.jsonl"
    os.mkfifo(pipe)
    for path in (pipe, "/dev/zero"):
        for format in ("auto", "jsonl", "csv"):
            with pytest.raises(DatasetError, match=r"is not a regular file \(a pipe or a device\): save the captions to a file"):
                read_dataset([path], format=format)
