"""Proof that training learns: both decoders on the generated shapes set, scored on held-out images."""

from collections import Counter

import pytest

from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig
from captioner.models.captioner import Captioner
from captioner.data.features import split_features
from captioner.evaluation import decode_split, score_split
from captioner.training.loop import train
from conftest import shapes_train_config


def most_common_caption_baseline(prepared):
    """Caption every test image with the training set's most common caption (a trivial baseline)."""
    dataset = PreparedDataset(prepared)
    counts = Counter(c for i in dataset.split_images("train") for c in dataset.images[i]["captions"])
    common = counts.most_common(1)[0][0]
    from captioner.metrics import score_captions

    test = dataset.split_images("test")
    return score_captions({i: common for i in test}, {i: dataset.images[i]["captions"] for i in test}, metrics=["BLEU-4", "CIDEr-D"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_training_learns_the_shapes_set(shapes_prepared, tmp_path, kind):
    config = shapes_train_config(shapes_prepared, tmp_path / "run", decoder={"kind": kind})
    state = train(config)
    assert state.best_epoch >= 0 and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    model = Captioner.load(tmp_path / "run" / "best")
    dataset = PreparedDataset(shapes_prepared)
    features = split_features(model, dataset, "test", progress=False)
    captions = decode_split(model, dataset, "test", GenerationConfig(beam_size=3, max_length=16), features=features, progress=False)
    scores = score_split(dataset, captions, metrics=["BLEU-4", "CIDEr-D"])
    baseline = most_common_caption_baseline(shapes_prepared)
    # Held-out images, real decoding: far above captioning everything with the commonest sentence.
    assert scores["BLEU-4"] > 45 and scores["BLEU-4"] > 3 * baseline["BLEU-4"], (scores, baseline)
    assert scores["CIDEr-D"] > 3 * baseline["CIDEr-D"], (scores, baseline)
    history = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == config.epochs and (tmp_path / "run" / "curves.png").stat().st_size > 1000
