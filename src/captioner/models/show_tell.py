"""Show and Tell (Vinyals et al. 2015): the image conditions an LSTM language model.

The pooled image vector (mean of the P region features) either initialises the LSTM state,
h0 = W_h v and c0 = W_c v (``image_input="init_state"``), or is fed as the input before <start>
from a zero state, as in the paper (``"first_step"``). Teacher forcing packs the captions so no
step runs on padding; scheduled sampling runs one step at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from captioner.models.decoder import Decoder, DecoderConfig, DecoderOutput, DecoderState, captions_per_image, repeat_state, word_embedding


class ShowTell(Decoder):
    has_attention = False
    step_matrices = ("lstm", "classifier")

    def __init__(self, config: DecoderConfig, vocab_size: int, feature_dim: int) -> None:
        super().__init__()
        self.config, self.vocab_size, self.feature_dim = config, vocab_size, feature_dim
        E, H, D = config.embed_dim, config.hidden_dim, feature_dim
        self.embedding = word_embedding(vocab_size, E)
        if config.image_input == "init_state":
            self.init_h = nn.Linear(D, H)
            self.init_c = nn.Linear(D, H)
        else:
            self.image_embedding = nn.Linear(D, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.word_output(H)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        image = features.mean(dim=1)  # (B, D)
        if self.config.image_input == "init_state":
            return {"h": self.init_h(image), "c": self.init_c(image)}  # (B, H) each
        x = self.dropout(self.image_embedding(image)).unsqueeze(1)  # (B, 1, E): the input x_-1
        _, (h, c) = self.lstm(x)  # from a zero state
        return {"h": h.squeeze(0), "c": c.squeeze(0)}

    def step(self, tokens: torch.Tensor, state: DecoderState, attention: bool = True) -> tuple[torch.Tensor, DecoderState, None]:
        x = self.embedding(tokens).unsqueeze(1)  # (B, 1, E)
        output, (h, c) = self.lstm(x, (state["h"].unsqueeze(0), state["c"].unsqueeze(0)))  # (B, 1, H)
        logits = self.word_logits(self.dropout(output.squeeze(1)))  # (B, V)
        return logits, {"h": h.squeeze(0), "c": c.squeeze(0)}, None

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, sampling_probability: float = 0.0, hard_attention: str | None = None
    ) -> DecoderOutput:
        state = repeat_state(self.init_state(features), captions_per_image(features, captions))
        steps = (lengths - 1).clamp(min=1).cpu()  # (B,) words to predict per caption
        total = int(steps.max())
        if sampling_probability > 0:
            return DecoderOutput(self._forward_sampled(state, captions[:, :total], steps, sampling_probability))
        embedded = self.dropout(self.embedding(captions[:, :total]))  # (B, T-1, E): inputs <start> .. w_n
        packed = pack_padded_sequence(embedded, steps, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed, (state["h"].unsqueeze(0).contiguous(), state["c"].unsqueeze(0).contiguous()))
        # The classifier runs on real steps only (packed data), then is laid out as (B, T-1, V).
        logits_packed = self.word_logits(self.dropout(output.data))  # (sum of steps, V)
        logits, _ = pad_packed_sequence(output._replace(data=logits_packed), batch_first=True, total_length=total)
        return DecoderOutput(logits)

    def _forward_sampled(self, state: DecoderState, inputs: torch.Tensor, steps: torch.Tensor, probability: float) -> torch.Tensor:
        """Scheduled sampling: one LSTM step at a time, each input after the first the reference word
        or (with ``probability``) a sample of the step before's prediction. Logits (B, T-1, V), zero
        past each caption's end."""
        h, c = state["h"].unsqueeze(0), state["c"].unsqueeze(0)  # (1, B, H)
        per_step: list[torch.Tensor] = []
        for t in range(inputs.shape[1]):
            tokens = inputs[:, t] if t == 0 else self.scheduled_inputs(inputs[:, t], per_step[-1], probability)
            output, (h, c) = self.lstm(self.dropout(self.embedding(tokens)).unsqueeze(1), (h, c))  # (B, 1, H)
            per_step.append(self.word_logits(self.dropout(output.squeeze(1))))  # (B, V)
        logits = torch.stack(per_step, dim=1)  # (B, T-1, V)
        real = torch.arange(inputs.shape[1]) < steps.unsqueeze(1)  # (B, T-1)
        return logits * real.unsqueeze(2).to(logits.device, logits.dtype)
