"""Show, Attend and Tell (Xu et al. 2015): an LSTM that looks at a different part of the image per word.

Per step: attend over the P regions with the previous hidden state, read the context (soft attention:
the expected feature under the weights; hard attention, ``attention = "hard"``: the feature at one
region, sampled from the weights in training, the paper's section 4.1), gate it with
beta = sigmoid(W_b h) (the paper's section 4.2.1), feed [word embedding; gated context] to the LSTM,
predict the next word from the new hidden state (or, with ``deep_output``, from embedding + hidden +
context as in the paper's eq. 7). The state starts from the mean feature: h0 = W_h mean(f),
c0 = W_c mean(f). Teacher forcing runs only the rows still inside their caption at each step;
scheduled sampling (``sampling_probability``) feeds some steps the decoder's own sampled word instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.attention import SoftAttention
from captioner.models.decoder import HARD_TRAINING, Decoder, DecoderConfig, DecoderOutput, DecoderState, captions_per_image, repeat_state, sort_by_length, word_embedding


class ShowAttendTell(Decoder):
    has_attention = True
    image_constant_keys = ("features", "projected")
    step_matrices = ("gate", "lstm", "out_hidden", "out_context", "classifier")  # and attention's own

    def __init__(self, config: DecoderConfig, vocab_size: int, feature_dim: int) -> None:
        super().__init__()
        self.config, self.vocab_size, self.feature_dim = config, vocab_size, feature_dim
        E, H, D = config.embed_dim, config.hidden_dim, feature_dim
        self.embedding = word_embedding(vocab_size, E)
        self.attention = SoftAttention(D, H, config.attention_dim)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.gate = nn.Linear(H, D)  # beta: how much of the context to let in at this step
        self.lstm = nn.LSTMCell(E + D, H)
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            self.out_hidden = nn.Linear(H, E)
            self.out_context = nn.Linear(D, E)
        self.word_output(E if config.deep_output else H)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        mean = features.mean(dim=1)  # (B, D)
        return {
            "h": self.init_h(mean),  # (B, H)
            "c": self.init_c(mean),  # (B, H)
            "features": features,  # (B, P, D)
            "projected": self.attention.project(features),  # (B, P, A), once per image
        }

    def reading(self, hard_attention: str | None = None) -> str:
        """How this step reads the image: "expected" (soft attention, or hard attention decoding with
        the expected feature), "argmax" or "sample" (one region per row)."""
        if self.config.attention == "soft":
            return "expected"
        if hard_attention is not None and hard_attention not in HARD_TRAINING:
            raise ValueError(f"hard_attention must be one of {HARD_TRAINING} or None, not {hard_attention!r}")
        return hard_attention or self.config.hard_decoding

    def _recur(self, embedded: torch.Tensor, state: DecoderState, reading: str) -> tuple[DecoderState, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """embedded (B, E) + state -> next state, gated context (B, D), alpha (B, P) and the region
        read (B,) or None (``reading`` "expected"): one LSTM step."""
        features, projected, h, c = state["features"], state["projected"], state["h"], state["c"]
        alpha = self.attention.weights(projected, h)  # (B, P)
        if reading == "expected":
            location, context = None, self.attention.read(features, alpha)  # (B, D)
        else:
            location = torch.multinomial(alpha.detach().float(), 1).squeeze(1) if reading == "sample" else alpha.argmax(dim=1)  # (B,)
            context = self.attention.read_at(features, location)  # (B, D)
        context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))  # (B, H) each
        return {"h": h, "c": c, "features": features, "projected": projected}, context, alpha, location

    def _logits(self, embedded: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The word distribution from one step's outputs (any leading shape): (..., V)."""
        if self.config.deep_output:
            return self.word_logits(self.dropout(embedded + self.out_hidden(h) + self.out_context(context)))
        return self.word_logits(self.dropout(h))

    def step(self, tokens: torch.Tensor, state: DecoderState, attention: bool = True) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """One word per row; the attention returned is where it read: the weights, or for hard
        attention decoding at the argmax a one-hot row on the region read (computed either way:
        the step needs the weights)."""
        embedded = self.embedding(tokens)  # tokens (B,) -> (B, E)
        state, context, alpha, location = self._recur(embedded, state, self.reading())
        if location is not None:
            alpha = F.one_hot(location, alpha.shape[1]).to(alpha.dtype)  # (B, P)
        return self._logits(embedded, state["h"], context), state, alpha  # (B, V)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, sampling_probability: float = 0.0, hard_attention: str | None = None
    ) -> DecoderOutput:
        state = repeat_state(self.init_state(features), captions_per_image(features, captions))  # projection done per image, then shared
        steps = (lengths - 1).clamp(min=0)  # (B,) words to predict per caption
        order, inverse = sort_by_length(steps)
        state = {key: value[order] for key, value in state.items()}
        sorted_captions = captions[order]
        embedded = self.dropout(self.embedding(sorted_captions))  # (B, T, E)
        sorted_steps = steps[order].tolist()
        total = sorted_steps[0] if sorted_steps else 0
        batch = captions.shape[0]
        sampling = sampling_probability > 0
        reading = self.reading(hard_attention)
        hidden, contexts, alphas, locations, step_logits = [], [], [], [], []
        active = batch
        for t in range(total):
            while active > 0 and sorted_steps[active - 1] <= t:
                active -= 1  # rows are sorted by length: finished ones drop off the end
            state = {key: value[:active] for key, value in state.items()}
            word = embedded[:active, t]  # (active, E)
            if sampling and t > 0:
                tokens = self.scheduled_inputs(sorted_captions[:active, t], step_logits[-1][:active], sampling_probability)
                word = self.dropout(self.embedding(tokens))
            state, context, alpha, location = self._recur(word, state, reading)
            hidden.append(state["h"])
            contexts.append(context)
            alphas.append(alpha)
            if reading == "sample":
                locations.append(location)
            if sampling:  # the next step samples from this one's prediction
                step_logits.append(self._logits(word, state["h"], context))
        # Without sampling, the word predictions run once, over the real steps of every caption
        # together (one big matrix product instead of one per step); padded positions stay zero and
        # are never computed.
        real = torch.arange(total, device=lengths.device) < steps[order].unsqueeze(1)  # (B, T-1)
        if total and sampling:
            logits = _stack_steps(step_logits, batch)  # (B, T-1, V)
            alpha_grid = _stack_steps(alphas, batch)
        elif total:
            h = _stack_steps(hidden, batch)[real]  # (real steps, H)
            context = _stack_steps(contexts, batch)[real] if self.config.deep_output else h  # (real steps, D)
            packed = self._logits(embedded[:, :total][real], h, context)  # (real steps, V)
            logits = packed.new_zeros(batch, total, self.vocab_size)  # (B, T-1, V)
            logits[real] = packed
            alpha_grid = _stack_steps(alphas, batch)  # (B, T-1, P), zeros past each caption's end
        else:
            logits = embedded.new_zeros(batch, 0, self.vocab_size)
            alpha_grid = embedded.new_zeros(batch, 0, features.shape[1])
        if reading != "sample":
            return DecoderOutput(logits[inverse], alpha_grid[inverse])
        read = torch.full((batch, total), -1, dtype=torch.long, device=lengths.device)  # (B, T-1)
        for t, location in enumerate(locations):
            read[: location.shape[0], t] = location
        return DecoderOutput(logits[inverse], alpha_grid[inverse], read[inverse])


def _stack_steps(per_step: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Per-step outputs of the active (longest-first) rows, (active_t, X) each -> (batch, T, X), zero-padded."""
    return torch.stack([F.pad(x, (0, 0, 0, batch - x.shape[0])) for x in per_step], dim=1)
