"""Captioner.caption_batch, the one way from model inputs to results: what it refuses."""

import pytest
import torch
from conftest import make_model

from captioner.decoding import GenerationConfig
from captioner.errors import CaptionerError


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_features_that_are_not_finite_are_one_line_naming_the_image(bad):
    # NaN or inf features (a damaged feature cache, a broken input) would decode to nonsense or fail
    # deep in the search; they are refused before decoding, naming the image
    model = make_model("attention")
    features = torch.randn(3, 4, model.decoder.feature_dim)
    config = GenerationConfig.for_captions(3, 1, return_attention=False)
    assert len(model.caption_batch(features, config, ["a.jpg", "b.jpg", "c.jpg"])) == 3
    features[1, 2, 5] = bad
    with pytest.raises(CaptionerError, match=r"^the features of b\.jpg are not finite \(NaN or inf\): a damaged feature cache or input$"):
        model.caption_batch(features, config, ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(CaptionerError, match=r"^the features of image 1 are not finite"):
        model.caption_batch(features, config)
