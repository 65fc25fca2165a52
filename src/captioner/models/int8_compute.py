"""int8 compute for decoding on a CPU: the matrices a decoder reads at every step, in int8.

At batch 1 a decoding step is a handful of matrix-vector products, and reading their float32
weights from memory is most of its time (an LSTM cell of the shipped model is 14.7 MB, read about 15
times per caption). :func:`int8_twin` gives a decoder that shares everything with the original
except those matrices, which it holds in int8 for PyTorch's int8 kernels (``torch.ops.quantized``,
fbgemm on x86, with the weights packed as ``torch.ao``'s dynamic modules pack them): weights in int8
with one scale per output row, symmetric in [-127, 127] (the shipped checkpoint's own format, so
its stored weights come back exactly), and each step's input rounded to 7 bits on the fly with
**one scale per row** (per beam and image), as LLM.int8 and SmoothQuant quantize activations per
token. That input rounding is the only change to the arithmetic; captions can differ where two
words were nearly tied (measured in the README on the Flickr8k dev split).

PyTorch's dynamic kernel picks one input scale per call, which made a row's rounding depend on the
other rows of the call (the other beams and images of a batch, so a photo's caption on what it was
captioned with). Here each row is mapped onto [-1, 1] by its own range and rounded with one fixed
scale (the kernel that takes the input's scale, ``linear_with_input_q_dq_qweight_dq_output_fp32``),
and the product mapped back: a row is rounded the same way whatever shares its call and the integer
products are exact, so the batch reaches an int8 caption only through float32's last-bit
differences between batch sizes, as it reaches a float32 one. A hidden state is rounded about zero
(:func:`linear_rows`); the LSTM's input, which holds the image context (non-negative features),
over its own [low, high] (:func:`linear_rows_over_range`), with zero exact. Inputs use 7 bits (as
the dynamic kernels' ``reduce_range``): 8 can saturate 16-bit sums on x86 CPUs without VNNI, and a
caption would depend on the CPU. Against float32, each step's log-probabilities are about 30% closer
than with one scale per call over a batch of 64 photos, less over small batches, whose rows shared a
narrower range (README).

The twin is rebuilt (cheaply) for every decoding call; the quantized matrices are cached per
module and redone only when a module is replaced or its weights change (a vocabulary extended
for a new concept word replaces just the output layer).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from captioner.errors import ConfigError

DECODER_COMPUTE = ("auto", "float32", "int8")

_QUANTIZABLE = (nn.Linear, nn.LSTMCell, nn.LSTM)
_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], nn.Module]] = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def int8_available() -> bool:
    """Whether this PyTorch computes int8 matrix products with a given input scale on this CPU (its
    x86 engine, fbgemm, does; Arm's qnnpack lacks that kernel): tried once on a 2 x 2 matrix."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            linear_rows(torch.ones(1, 2), _packed(torch.ones(2, 2)))
    except RuntimeError:
        return False
    return True


def resolve_decoder_compute(choice: str, *, device: torch.device, stored_int8: bool) -> str:
    """``"auto"`` -> int8 on a CPU for a checkpoint stored in int8 (its weights are int8 already,
    so only the inputs' rounding is new), float32 otherwise; an explicit choice is checked."""
    if choice not in DECODER_COMPUTE:
        raise ConfigError(f"decoder compute must be one of {', '.join(DECODER_COMPUTE)}, not {str(choice)[:40]!r}")
    usable = device.type == "cpu" and int8_available()
    if choice == "auto":
        return "int8" if stored_int8 and usable else "float32"
    if choice == "int8" and not usable:
        where = f"this model is on {device}" if device.type != "cpu" else "this PyTorch has no such kernel here"
        raise ConfigError(f"int8 decoder compute runs on a CPU with PyTorch's x86 int8 engine (fbgemm): {where} (use float32)")
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


def _packed(weight: torch.Tensor) -> Any:
    return torch.ops.quantized.linear_prepack(quantize_rows(weight), None)


#: A row's inputs are rounded onto the levels 64 - 62 ... 64 + 62 of the kernel's 0..127 (7 bits: the
#: range PyTorch's dynamic kernels use with ``reduce_range``, which x86 CPUs without VNNI need to
#: keep their 16-bit sums from saturating), spread over the row's range.
ROW_LEVELS = 62
ROW_SCALE, ROW_ZERO_POINT = 1.0 / ROW_LEVELS, 64
_TINY = torch.finfo(torch.float32).tiny
_kernel = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32


def linear_rows(x: torch.Tensor, packed: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T + bias in int8, each row of ``x`` rounded over [-m, m], m its largest magnitude
    (x / m rounded with the fixed :data:`ROW_SCALE`, the product multiplied back by m): for inputs
    spread about zero, such as a hidden state."""
    magnitude = x.abs().amax(dim=1, keepdim=True).clamp_min_(_TINY)
    product = _kernel(x / magnitude, ROW_SCALE, ROW_ZERO_POINT, packed)
    return product.mul_(magnitude) if bias is None else torch.addcmul(bias, product, magnitude)


def linear_rows_over_range(x: torch.Tensor, packed: Any, row_sums: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`linear_rows`, each row rounded over its own [low, high] instead, for inputs far from
    symmetric about zero (an attention context of non-negative image features: over [-m, m] half
    the levels would go unused): x = centre + half_range * x', x' in [-1, 1] rounded with the fixed
    scale, the centre a whole number of steps so that zero is exact (a rounding error shared by every
    zero input would add up, not cancel); W x = half_range * (W x') + centre * (W's ``row_sums`` (1, N)).
    Two more passes over the rows than :func:`linear_rows`."""
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    half_range = torch.sub(high, low).mul_(0.5).clamp_min_(_TINY)
    step = half_range / ROW_LEVELS
    centre = torch.add(low, high).mul_(0.5).div_(step).round_().mul_(step)
    product = _kernel((x - centre).div_(half_range), ROW_SCALE, ROW_ZERO_POINT, packed)
    product = product.mul_(half_range) if bias is None else torch.addcmul(bias, product, half_range)
    return product.addcmul_(centre, row_sums)


class Int8Linear(nn.Module):
    """``nn.Linear`` computing in int8: weights per output row, inputs per row (:func:`linear_rows`;
    the per-step layers it stands for read a hidden state)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = _packed(weight)
        self.bias = None if bias is None else bias.detach().float()

    def weight(self) -> torch.Tensor:
        """The int8 weight matrix (out, in)."""
        return torch.ops.quantized.linear_unpack(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_rows(x, self.packed, self.bias)


class Int8LSTMCell(nn.Module):
    """``nn.LSTMCell`` computing in int8: the input (a word's embedding and the image context) rounded
    per row over its own range (:func:`linear_rows_over_range`), the hidden state per row about zero
    (:func:`linear_rows`); the biases and the gates' arithmetic stay float32."""

    def __init__(self, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> None:
        super().__init__()
        if bias_ih is None or bias_hh is None:
            raise ConfigError("int8 compute needs an LSTM cell with biases")
        self.hidden_size = weight_hh.shape[1]
        self.packed_ih, self.packed_hh = _packed(weight_ih), _packed(weight_hh)
        self.row_sums_ih = torch.ops.quantized.linear_unpack(self.packed_ih)[0].dequantize().sum(dim=1).unsqueeze(0)  # (1, 4H)
        self.bias = (bias_ih.detach() + bias_hh.detach()).float()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = linear_rows_over_range(x, self.packed_ih, self.row_sums_ih, self.bias).add_(linear_rows(h, self.packed_hh))
        size = self.hidden_size
        sigmoids = gates[:, : 2 * size].sigmoid()  # input and forget gates (PyTorch's order: i, f, g, o)
        c = torch.addcmul(sigmoids[:, size:] * c, sigmoids[:, :size], gates[:, 2 * size : 3 * size].tanh())
        return gates[:, 3 * size :].sigmoid_().mul_(c.tanh()), c


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
