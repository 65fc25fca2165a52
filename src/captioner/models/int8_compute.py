"""int8 compute for decoding on a CPU: the matrices a decoder reads at every step, in int8.

At batch 1 a decoding step is a handful of matrix-vector products, and reading their float32
weights from memory is most of its time (an LSTM cell of the shipped model is 14.7 MB, read about 15
times per caption). :func:`int8_twin` gives a decoder that shares everything with the original
except those matrices, which it holds as PyTorch's dynamically quantized modules: weights in int8
with one scale per output row, symmetric in [-127, 127] (the shipped checkpoint's own format, so
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
    float_module = copy.copy(module)  # from_float reads a qconfig off the module: set it on a copy
    float_module.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
        weight=torch.ao.quantization.PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
        ),
    )
    dynamic = {nn.Linear: torch.ao.nn.quantized.dynamic.Linear, nn.LSTMCell: torch.ao.nn.quantized.dynamic.LSTMCell, nn.LSTM: torch.ao.nn.quantized.dynamic.LSTM}
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices: the kernels are what we use, pinned with torch
        warnings.simplefilter("ignore")
        quantized = dynamic[type(module)].from_float(float_module)
    _cache[module] = (key, quantized)
    return quantized
