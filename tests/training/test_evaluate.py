"""captioner evaluate on a model trained on the shapes set: files, table, several beams, METEOR."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.training.loop import train
from conftest import shapes_train_config


@pytest.fixture(scope="module")
def trained_run(shapes_prepared, tmp_path_factory):
    """Trained with the data named by a path relative to where training ran (not where evaluate runs)."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    here = os.getcwd()
    os.chdir(shapes_prepared.parent)
    try:
        train(shapes_train_config(Path(shapes_prepared.name), out, epochs=4, decoder={"kind": "show_tell"}))
    finally:
        os.chdir(here)
    return out


def evaluate(*args):
    return subprocess.run([sys.executable, "-m", "captioner", "evaluate", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_evaluate_writes_results_for_each_beam(trained_run, tmp_path):
    result = evaluate(str(trained_run / "best"), "--split", "test", "--beam", "1", "3", "--out", str(tmp_path / "eval"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "BLEU-4" in result.stdout and "CIDEr-D" in result.stdout and "METEOR" in result.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["beams"]) == {"1", "3"} and results["images"] == 40
    for scores in results["beams"].values():
        assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}
        assert 0 < scores["BLEU-4"] <= 100 and scores["CIDEr-D"] > 0
    lines = [json.loads(line) for line in (tmp_path / "eval" / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and set(lines[0]["generated"]) == {"beam1", "beam3"} and len(lines[0]["references"]) >= 3


@pytest.mark.slow
def test_evaluate_defaults_and_errors(trained_run, tmp_path):
    # --data defaults to what the checkpoint was trained on; output goes beside the checkpoint
    result = evaluate(str(trained_run / "best"), "--split", "val", "--no-meteor", "--limit", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((trained_run / "eval-best-val" / "results.json").read_text())["images"] == 10
    for args, message in [
        ((str(tmp_path / "missing"),), "no checkpoint"),
        ((str(trained_run / "best"), "--beam", "0"), "--beam must be a whole number from 1 to 100, not 0"),
        ((str(trained_run / "best"), "--data", str(tmp_path)), "not a prepared dataset"),
        ((str(trained_run / "best"), "--device", "cuda:7"), "CUDA"),
        ((str(trained_run / "best"), "--hard-decoding", "argmax"), "no hard-attention decoder"),
        ((str(trained_run / "best"), "--hard-decoding", "sample"), "invalid choice"),
    ]:
        result = evaluate(*args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


@pytest.mark.slow
def test_an_ensemble_with_a_flipped_view_is_made_and_evaluated_from_the_command_line(trained_run, tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "captioner", "ensemble", str(trained_run / "best"), str(trained_run / "last"), "--flip", "--length-penalty", "0.7", "--no-repeat-ngram", "2", "--out", str(tmp_path / "ensemble")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "2 decoder(s) x 2 view(s) (plain, flip)" in made.stdout
    # the data comes from the members' training; the flipped view gets its own feature cache
    result = evaluate(str(tmp_path / "ensemble"), "--split", "val", "--no-meteor", "--limit", "10", "--quiet", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["beams"]["3"]["CIDEr-D"] > 0
    # the ensemble's own decoding settings, stored with it
    assert (results["length_penalty"], results["no_repeat_ngram_size"]) == (0.7, 2)
    assert "length penalty 0.7, no repeated 2-grams" in result.stdout
    told = evaluate(str(tmp_path / "ensemble"), "--split", "val", "--no-meteor", "--limit", "10", "--quiet", "--length-penalty", "0", "--no-repeat-ngram", "0", "--out", str(tmp_path / "eval0"))
    assert told.returncode == 0, told.stderr
    results = json.loads((tmp_path / "eval0" / "results.json").read_text())
    assert (results["length_penalty"], results["no_repeat_ngram_size"]) == (0, 0)
    bad = subprocess.run([sys.executable, "-m", "captioner", "ensemble", str(trained_run / "best"), "--flip", "--length-penalty", "-1", "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--length-penalty must be a number from 0 to 10, not -1" in bad.stderr and not (tmp_path / "y").exists()
    again = subprocess.run([sys.executable, "-m", "captioner", "ensemble", str(trained_run / "best"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert again.returncode != 0 and "needs two models, or --flip" in again.stderr and "Traceback" not in again.stderr


def test_view_features_put_each_views_regions_side_by_side_however_they_are_read():
    import numpy as np

    from captioner.data.features import ViewFeatures

    plain, flip = np.arange(3 * 4 * 2).reshape(3, 4, 2), -np.arange(3 * 4 * 2).reshape(3, 4, 2)
    both = ViewFeatures([plain, flip])
    expected = np.concatenate([plain, flip], axis=1)  # (images, 2 * 4 regions, 2)
    assert both.shape == (3, 8, 2) and len(both) == 3
    assert np.array_equal(both[:], expected) and np.array_equal(both[1:3], expected[1:3])
    assert np.array_equal(both[[2, 0]], expected[[2, 0]])
    assert np.array_equal(both[1], expected[1])  # one image: (8, 2), not its feature vectors joined
    assert np.array_equal(np.asarray(both), expected) and np.asarray(both, dtype=np.float32).dtype == np.float32


def test_the_split_s_cider_d_interval_scores_the_split_once(monkeypatch):
    """Per-image CIDEr-D for the bootstrap is one pass over the split (it once ran once per image:
    hours on 1,000 images), and the interval brackets the corpus score."""
    from types import SimpleNamespace

    import captioner.metrics.coco as coco
    from captioner.evaluation import caption_checks

    calls = []

    def counted(generated, references, **_):
        calls.append(len(generated))
        return real(generated, references, tokenize=False)  # no Java tokenizer needed for this

    real = coco.cider_per_image
    monkeypatch.setattr(coco, "cider_per_image", counted)
    words = ["dog", "cat", "ball", "grass", "water", "snow", "man", "girl"]
    references = {i: [f"a {w} on the {words[(i + 1) % 8]}", f"the {w} is here", f"one {w} near {words[(i + 2) % 8]}"] for i, w in enumerate(words)}
    dataset = SimpleNamespace(images={i: {"captions": refs} for i, refs in references.items()})
    captions = {
        i: SimpleNamespace(text=f"a {w} on the {words[(i + 1) % 8]}" if i % 2 else f"a {w}", constraints=[[w]] if i < 3 else [], familiar=i >= 5)
        for i, w in enumerate(words)
    }
    checks = caption_checks(dataset, captions, resamples=200)
    assert calls == [8]
    assert checks["steered by concepts"] == 3 and checks["familiar photos"] == 3
    per_image = real({i: c.text for i, c in captions.items()}, references, tokenize=False)
    low, high = checks["CIDEr-D 95% interval"]
    assert low <= sum(per_image.values()) / 8 <= high
