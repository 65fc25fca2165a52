"""int8 decoding: the per-step matrices in int8, everything else shared and unchanged."""

from pathlib import Path

import pytest
import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.models.int8_compute import Int8Linear, Int8LSTM, Int8LSTMCell, int8_twin, resolve_decoder_compute
from tests.conftest import make_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DYNAMIC = (Int8Linear, Int8LSTMCell, Int8LSTM)


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load("default")


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_the_shipped_model_decodes_in_int8_and_a_float32_checkpoint_does_not(shipped, tmp_path):
    assert shipped.decoder_compute == "int8"  # stored in int8: its weights are int8 already
    assert Captioner.load("default", decoder_compute="float32").decoder_compute == "float32"
    model = make_model("attention", pretrained=True)
    model.save(tmp_path / "float")
    assert Captioner.load(tmp_path / "float").decoder_compute == "float32"
    assert Captioner.load(tmp_path / "float", decoder_compute="int8").decoder_compute == "int8"
    with pytest.raises(ConfigError, match="decoder compute must be one of"):
        Captioner.load(tmp_path / "float", decoder_compute="int4")
    with pytest.raises(ConfigError, match="runs on a CPU"):
        resolve_decoder_compute("int8", device=torch.device("cuda"), stored_int8=True)
    assert resolve_decoder_compute("auto", device=torch.device("cuda"), stored_int8=True) == "float32"


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_only_the_per_step_matrices_are_int8_and_the_original_is_untouched(kind):
    model = make_model(kind, embed_dim=32, hidden_dim=48, attention_dim=16, scale=4.0)
    decoder = model.decoder
    before = _weights(decoder)
    twin = int8_twin(decoder)
    quantized = {name for name, module in twin.named_modules() if isinstance(module, DYNAMIC)}
    expected = {"lstm", "classifier"} | ({"gate", "attention.hidden_proj"} if kind == "attention" else set())
    assert quantized == expected
    assert all(not isinstance(module, DYNAMIC) for module in decoder.modules())  # the original keeps its float modules
    assert all(torch.equal(before[name], value) for name, value in decoder.state_dict().items())
    assert twin.embedding is decoder.embedding and twin.init_h is decoder.init_h  # shared, not copied
    if kind == "attention":
        assert twin.attention.score is decoder.attention.score and twin.attention.feature_proj is decoder.attention.feature_proj
    features = torch.randn(3, 9, decoder.feature_dim)
    tokens = torch.tensor([1, 4, 5])
    with torch.inference_mode():
        exact, _, _ = decoder.step(tokens, decoder.init_state(features))
        approximate, _, _ = twin.step(tokens, twin.init_state(features))
    assert not torch.equal(exact, approximate)  # it really computes differently
    assert torch.allclose(torch.log_softmax(exact, -1), torch.log_softmax(approximate, -1), atol=0.05)


def test_int8_decoding_of_the_shipped_model_is_close_to_float32(shipped):
    """The same beam-search captions on the example photos, their log-probabilities within 0.1."""
    exact = Captioner.load("default", decoder_compute="float32")
    for photo in sorted(EXAMPLES.glob("*.jpg")):
        fast, slow = shipped.caption(photo, n_best=3), exact.caption(photo, n_best=3)
        assert [r.text for r in fast.n_best] == [r.text for r in slow.n_best], photo.name
        assert all(abs(a.log_prob - b.log_prob) < 0.1 for a, b in zip(fast.n_best, slow.n_best)), photo.name


def test_quantized_matrices_are_reused_and_only_a_replaced_layer_is_redone():
    model = Captioner.load("default")  # its own: extending the vocabulary changes it
    first, second = model.decoding_decoder(), model.decoding_decoder()
    lstm = first.members[0].lstm
    assert second.members[0].lstm is lstm  # cached: quantized once, not per call
    model.extend_vocabulary(["zebra"])
    extended = model.decoding_decoder()
    assert extended.members[0].lstm is lstm  # the LSTM did not change
    assert extended.members[0].classifier is not first.members[0].classifier
    assert extended.members[0].classifier.weight().shape[0] == len(model.vocab)  # with the new word's row
    with torch.no_grad():  # weights changed in place (trained further) are quantized again
        model.decoder.members[1].gate.weight.mul_(1.0)
    assert model.decoding_decoder().members[1].gate is not first.members[1].gate
    assert model.decoding_decoder().members[0].gate is first.members[0].gate


def _torch_ao_dynamic(module: nn.Module) -> nn.Module:
    """torch.ao's dynamic quantization of ``module``, per-row symmetric weights in [-127, 127]."""
    import copy
    import warnings

    observed = copy.copy(module)
    observed.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.quint8, is_dynamic=True),
        weight=torch.ao.quantization.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127),
    )
    dynamic = {nn.Linear: torch.ao.nn.quantized.dynamic.Linear, nn.LSTMCell: torch.ao.nn.quantized.dynamic.LSTMCell, nn.LSTM: torch.ao.nn.quantized.dynamic.LSTM}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dynamic[type(module)].from_float(observed)


def test_int8_matrices_compute_exactly_what_torch_ao_dynamic_quantization_computes(shipped):
    """Our int8 modules quantize the weights directly (no observers, no throwaway random init) and
    call the same kernels: bit for bit the same outputs as torch.ao's modules on the shipped
    model's matrices, and on an LSTM stepped a word at a time."""
    torch.manual_seed(0)
    member = shipped.decoder.members[0]
    twin = int8_twin(member)
    with torch.inference_mode():
        for name in ("gate", "classifier", "out_hidden"):
            layer = getattr(member, name, None)
            if layer is None:
                continue
            x = torch.randn(6, layer.in_features) * 3
            assert torch.equal(getattr(twin, name)(x), _torch_ao_dynamic(layer)(x)), name
        x = torch.randn(6, member.attention.hidden_proj.in_features)
        assert torch.equal(twin.attention.hidden_proj(x), _torch_ao_dynamic(member.attention.hidden_proj)(x))
        x, state = torch.randn(6, member.lstm.input_size), (torch.randn(6, member.lstm.hidden_size), torch.randn(6, member.lstm.hidden_size))
        ours, theirs = twin.lstm(x, state), _torch_ao_dynamic(member.lstm)(x, state)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        lstm = nn.LSTM(8, 12, batch_first=True)
        x, state = torch.randn(3, 1, 8), (torch.randn(1, 3, 12), torch.randn(1, 3, 12))
        ours, theirs = Int8LSTM(lstm)(x, state), _torch_ao_dynamic(lstm)(x, state)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1][1], theirs[1][1])
        assert torch.equal(Int8LSTM(lstm)(x)[0], _torch_ao_dynamic(lstm)(x)[0])  # from a zero state
    with pytest.raises(ConfigError, match="one-layer"):
        Int8LSTM(nn.LSTM(8, 12, num_layers=2, batch_first=True))
