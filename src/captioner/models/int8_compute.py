"""int8 compute for decoding on a CPU: the matrices a decoder reads at every step, in int8.

At batch 1 a decoding step is a handful of matrix-vector products, and reading their float32
weights from memory is most of its time (an LSTM cell of the shipped model is 14.7 MB, read about 15
times per caption). :func:`int8_twin` gives a decoder that shares everything with the original
except those matrices, which it holds in int8 for PyTorch's dynamic-quantization kernels
(``torch.ops.quantized``, the ones ``torch.ao``'s dynamic modules call): weights in int8 with one
scale per output row, symmetric in [-127, 127] (the shipped checkpoint's own format, so
its stored weights come back exactly), and each step's input quantized to 8 bits on the fly with
one scale per call. That input rounding is the only change to the arithmetic; captions can differ
where two words were nearly tied (measured in the README on the Flickr8k dev split).

One scale per call means a row's rounding depends on the other rows in the call (the other beams
and images of a batch); float32 is batch-independent to within float rounding.

The twin is rebuilt (cheaply) for every decoding call; the quantized matrices are cached per
module and redone only when a module is replaced or its weights change (a vocabulary extended
for a new concept word replaces just the output layer).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from captioner.errors import ConfigError

DECODER_COMPUTE = ("auto", "float32", "int8")

_QUANTIZABLE = (nn.Linear, nn.LSTMCell, nn.LSTM)
_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], nn.Module]] = weakref.WeakKeyDictionary()


def int8_available() -> bool:
    """Whether this PyTorch has a CPU engine for int8 matrix products (x86 or Arm)."""
    return bool(set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack", "onednn"})


def resolve_decoder_compute(choice: str, *, device: torch.device, stored_int8: bool) -> str:
    """``"auto"`` -> int8 on a CPU for a checkpoint stored in int8 (its weights are int8 already,
    so only the inputs' rounding is new), float32 otherwise; an explicit choice is checked."""
    if choice not in DECODER_COMPUTE:
        raise ConfigError(f"decoder compute must be one of {', '.join(DECODER_COMPUTE)}, not {str(choice)[:40]!r}")
    usable = device.type == "cpu" and int8_available()
    if choice == "auto":
        return "int8" if stored_int8 and usable else "float32"
    if choice == "int8" and not usable:
        raise ConfigError(f"int8 decoder compute runs on a CPU with PyTorch's int8 engine; this model is on {device} (use float32)")
    return choice


def int8_twin(decoder: nn.Module) -> nn.Module:
    """``decoder`` with its per-step matrices computing in int8: the children each module names in
    its ``step_matrices`` (those used once per image, such as the initial state, stay float32).
    Every other module and tensor is shared with ``decoder``, which is unchanged."""
    if not decoder._modules:
        return decoder
    twin = copy.copy(decoder)
    names = getattr(decoder, "step_matrices", ())
    twin._modules = {name: _quantized(child) if name in names else int8_twin(child) for name, child in decoder._modules.items()}
    return twin


def _quantized(module: nn.Module) -> nn.Module:
    if not isinstance(module, _QUANTIZABLE):
        raise ConfigError(f"cannot compute {type(module).__name__} in int8")
    key = tuple((parameter.data_ptr(), parameter._version) for parameter in module.parameters())
    cached = _cache.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    with warnings.catch_warnings():  # PyTorch's deprecation notice on quantized tensors: the kernels are what we use, pinned with torch
        warnings.simplefilter("ignore")
        if isinstance(module, nn.Linear):
            quantized: nn.Module = Int8Linear(module.weight, module.bias)
        elif isinstance(module, nn.LSTMCell):
            quantized = Int8LSTMCell(module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
        else:
            quantized = Int8LSTM(module)
    _cache[module] = (key, quantized)
    return quantized


def quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """A float matrix (out, in) -> int8 with one scale per row, symmetric in [-127, 127]: what
    PyTorch's per-channel symmetric weight observer gives, computed directly."""
    scale = (weight.detach().abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).eps)
    return torch.quantize_per_channel(weight.detach().float(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)


def _packed(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    return torch.ops.quantized.linear_prepack(quantize_rows(weight), None if bias is None else bias.detach().float())


class Int8Linear(nn.Module):
    """``nn.Linear`` computing in int8: weights per row, each call's input with one scale (as
    ``torch.ao``'s dynamic Linear, whose kernel this calls)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = _packed(weight, bias)

    def weight(self) -> torch.Tensor:
        """The int8 weight matrix (out, in)."""
        return torch.ops.quantized.linear_unpack(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)


class Int8LSTMCell(nn.Module):
    """``nn.LSTMCell`` computing in int8 (both of its matrices; the biases stay float32)."""

    def __init__(self, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> None:
        super().__init__()
        if bias_ih is None or bias_hh is None:
            raise ConfigError("int8 compute needs an LSTM cell with biases")
        self.hidden_size = weight_hh.shape[1]
        self.packed_ih, self.packed_hh = _packed(weight_ih, bias_ih), _packed(weight_hh, bias_hh)
        self.bias_ih, self.bias_hh = bias_ih.detach().float(), bias_hh.detach().float()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.quantized.quantized_lstm_cell_dynamic(x, state, self.packed_ih, self.packed_hh, self.bias_ih, self.bias_hh)


class Int8LSTM(Int8LSTMCell):
    """A one-layer, one-direction, batch-first ``nn.LSTM`` computing in int8, its cell a step at a
    time (decoding feeds it one word per call)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise ConfigError("int8 compute runs a one-layer, one-direction, batch-first LSTM with biases")
        super().__init__(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        """x (B, T, E), state ((1, B, H), (1, B, H)) or None (zeros) -> (B, T, H), the last state."""
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        h, c = (state[0][0], state[1][0]) if state is not None else (zeros, zeros)
        outputs = []
        for t in range(x.shape[1]):
            h, c = super().forward(x[:, t], (h, c))
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))
