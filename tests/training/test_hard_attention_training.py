"""Training hard attention: the gradient estimate is unbiased, the baseline moves as the paper's, the
term reaches the loss, and a hard-attention decoder learns the shapes set and looks at what it names."""

import itertools
import math

import numpy as np
import pytest
import torch

from captioner.training.distributed import Distributed
from captioner.training.hard_attention import batch_reading, caption_log_likelihood, next_baseline, reinforce_term
from conftest import make_model

WORDS = ("a", "red", "blue", "circle")


def exact_bound(decoder, features, caption):
    """E_s[log p(y | s, a)] over every sequence of regions s (P ** steps of them), each weighted by
    its probability under the attention: computed step by step from the decoder's parts, not its forward."""
    regions, steps = features.shape[1], len(caption) - 1
    total = features.new_zeros(())
    for sequence in itertools.product(range(regions), repeat=steps):
        state = decoder.init_state(features)
        h, c = state["h"], state["c"]
        log_p_regions = log_p_words = 0.0
        for t, region in enumerate(sequence):
            embedded = decoder.embedding(caption[t : t + 1])
            alpha = decoder.attention.weights(state["projected"], h)  # (1, P)
            context = torch.sigmoid(decoder.gate(h)) * features[:, region]
            h, c = decoder.lstm(torch.cat([embedded, context], dim=1), (h, c))
            log_p_words = log_p_words + torch.log_softmax(decoder._logits(embedded, h, context), dim=1)[0, caption[t + 1]]
            log_p_regions = log_p_regions + torch.log(alpha[0, region])
        total = total + torch.exp(log_p_regions) * log_p_words
    return total


def estimated_gradient(decoder, features, caption, rows, reinforce_weight, baseline):
    """The training loss's gradient (cross-entropy + the REINFORCE term) over ``rows`` sampled
    readings of one caption, scaled to estimate d E_s[log p(y | s, a)]."""
    captions = caption.repeat(rows, 1)
    lengths = torch.full((rows,), len(caption))
    output = decoder(features, captions, lengths, hard_attention="sample")
    targets = captions[:, 1:]
    mask = targets != 0
    words = int(mask.sum())
    cross_entropy = torch.nn.functional.cross_entropy(output.logits[mask], targets[mask])
    log_likelihood = caption_log_likelihood(output.logits, targets, mask)
    loss = cross_entropy + reinforce_term(output.attention, output.locations, log_likelihood, baseline, reinforce_weight=reinforce_weight, entropy_weight=0.0, words=words)
    gradients = torch.autograd.grad(loss, list(decoder.parameters()), allow_unused=True)
    # loss = -(1/words) sum_n [log p_n + (log p_n - b) log p(s_n)]: its mean over samples is -(rows / words) dE
    return [None if g is None else -g * words / rows for g in gradients]


def test_the_reinforce_gradient_is_unbiased_against_the_exact_expectation():
    torch.manual_seed(0)
    model = make_model("attention", words=WORDS, attention="hard", dropout=0.0, scale=3.0)
    decoder = model.decoder.double()
    features = torch.randn(1, 3, decoder.feature_dim, dtype=torch.float64) * 2
    caption = torch.tensor(model.vocab.encode("red"))
    bound = exact_bound(decoder, features, caption)
    parameters = list(decoder.parameters())
    exact = torch.autograd.grad(bound, parameters, allow_unused=True)
    attention_parameters = {id(p) for p in decoder.attention.parameters()}

    def errors(reinforce_weight):
        estimate = estimated_gradient(decoder, features, caption, 40000, reinforce_weight, baseline=float(bound.detach()))
        flat = lambda grads, on_attention: torch.cat([  # noqa: E731
            (g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters) if (id(p) in attention_parameters) == on_attention
        ])
        return {part: float((flat(estimate, part) - flat(exact, part)).norm() / flat(exact, part).norm()) for part in (True, False)}

    torch.manual_seed(1)
    with_reinforce = errors(1.0)
    assert with_reinforce[True] < 0.05 and with_reinforce[False] < 0.05, with_reinforce
    # The words' gradient alone misses how the regions are chosen: the attention learns nothing.
    without = errors(0.0)
    assert without[True] > 0.99 and without[False] < 0.1, without


def test_the_baseline_is_a_moving_average_of_the_sampled_captions():
    single = Distributed()
    first = next_baseline(None, torch.tensor(-30.0), torch.tensor(2.0), 0.9, single)
    assert first == -15.0  # the first sampled batch's mean
    assert next_baseline(first, torch.tensor(-40.0), torch.tensor(4.0), 0.9, single) == pytest.approx(0.9 * -15 + 0.1 * -10)
    assert next_baseline(first, torch.tensor(0.0), torch.tensor(0.0), 0.9, single) == first  # a batch that read the expected feature
    torch.manual_seed(0)
    readings = [batch_reading(0.5) for _ in range(2000)]
    assert abs(readings.count("sample") / 2000 - 0.5) < 0.05 and set(readings) == {"sample", "expected"}
    assert {batch_reading(0.0) for _ in range(20)} == {"sample"} and {batch_reading(1.0) for _ in range(20)} == {"expected"}


def test_the_entropy_bonus_pushes_towards_uniform_weights():
    attention = torch.tensor([[[0.7, 0.2, 0.1]]], requires_grad=True)
    locations = torch.tensor([[0]])
    term = reinforce_term(attention, locations, torch.zeros(1), 0.0, reinforce_weight=0.0, entropy_weight=1.0, words=1)
    (gradient,) = torch.autograd.grad(term, attention)
    # descending the loss raises the entropy: the likeliest region loses weight, the least likely gains
    assert gradient[0, 0, 0] > 0 > gradient[0, 0, 2]
    assert float(term.detach()) == pytest.approx(-(-sum(p * math.log(p) for p in (0.7, 0.2, 0.1))))


@pytest.mark.slow
def test_a_hard_attention_decoder_learns_the_shapes_set_and_reads_the_shape_it_names(trained_hard_shapes):
    from captioner import Captioner
    from conftest import names_the_shapes

    best, held_out = trained_hard_shapes
    model = Captioner.load(best)
    model.read_hard_attention_as("argmax")  # one region per word
    results = model.caption([item["path"] for item in held_out], beam_size=3)
    right = [names_the_shapes(result.words, item["shapes"]) for result, item in zip(results, held_out)]
    assert np.mean(right) >= 0.5, f"{sum(right)} of {len(right)} held-out captions name exactly the shapes there"
    on_named, share = [], []
    for result, item in zip(results, held_out):
        by_colour = {shape["colour"]: shape for shape in item["shapes"]}
        for index, word in enumerate(result.words):
            if word not in by_colour:
                continue
            grid = np.asarray(result.attention[index])
            assert grid.sum() == 1.0 and grid.max() == 1.0  # one region lit
            rows, cols = grid.shape
            ys, xs = np.mgrid[0:rows, 0:cols]
            xs, ys = (xs + 0.5) / cols * 128, (ys + 0.5) / rows * 128
            left, top, right_edge, bottom = by_colour[word]["box"]
            box = (xs >= left) & (xs <= right_edge) & (ys >= top) & (ys <= bottom)
            on_named.append(bool(box[grid == 1.0][0]))
            share.append(box.mean())
    assert len(on_named) > 50
    # Where "red" is said, the one region read lies on the red shape far more often than the
    # shape's share of the picture would give by chance.
    assert np.mean(on_named) > 2.5 * np.mean(share), (np.mean(on_named), np.mean(share))


@pytest.mark.slow
def test_evaluate_measures_either_reading_of_a_hard_attention_model(trained_hard_shapes, tmp_path):
    import json
    import subprocess
    import sys

    best, _ = trained_hard_shapes
    scores = {}
    for reading in ("expected", "argmax"):
        command = [sys.executable, "-m", "captioner", "evaluate", str(best), "--split", "test", "--beam", "3", "--no-meteor", "--quiet", "--hard-decoding", reading, "--out", str(tmp_path / reading)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        results = json.loads((tmp_path / reading / "results.json").read_text())
        assert results["hard_decoding"] == reading
        scores[reading] = results["beams"]["3"]["CIDEr-D"]
    assert min(scores.values()) > 100, scores  # the shapes set is learnt whichever way it is read


@pytest.mark.slow
def test_the_web_api_shows_the_one_region_each_word_read(trained_hard_shapes):
    from pathlib import Path

    import httpx

    from captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    best, held_out = trained_hard_shapes
    model = Captioner.load(best)
    model.read_hard_attention_as("argmax")
    item = held_out[0]
    expected = model.caption([item["path"]], beam_size=3)[0]
    with BackgroundServer(create_app(model, ServeConfig(beam_size=3, n_best=1, batch_wait_ms=2))) as server:
        answer = httpx.post(server.url + "api/caption", files={"image": (item["image"], Path(item["path"]).read_bytes(), "image/png")}, timeout=60).json()
    attention = np.asarray(answer["attention"])
    assert answer["caption"] == expected.text
    assert np.array_equal(attention, np.asarray(expected.attention))
    assert (attention.reshape(len(attention), -1).sum(axis=1) == 1).all() and set(np.unique(attention).tolist()) <= {0.0, 1.0}
