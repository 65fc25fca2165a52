"""Show, Attend and Tell (Xu et al. 2015): an LSTM that looks at a different part of the image per word.

Per step: attend over the P regions with the previous hidden state, gate the context with
beta = sigmoid(W_b h) (the paper's section 4.2.1), feed [word embedding; gated context] to the LSTM,
predict the next word from the new hidden state (or, with ``deep_output``, from embedding + hidden +
context as in the paper's eq. 7). The state starts from the mean feature: h0 = W_h mean(f),
c0 = W_c mean(f). Teacher forcing runs only the rows still inside their caption at each step.
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.attention import SoftAttention
from captioner.models.decoder import Decoder, DecoderConfig, DecoderState, repeat_state, sort_by_length


class ShowAttendTell(Decoder):
    has_attention = True
    image_constant_keys = ("features", "projected")

    def __init__(self, config: DecoderConfig, vocab_size: int, feature_dim: int) -> None:
        super().__init__()
        self.config, self.vocab_size, self.feature_dim = config, vocab_size, feature_dim
        E, H, D = config.embed_dim, config.hidden_dim, feature_dim
        self.embedding = nn.Embedding(vocab_size, E, padding_idx=0)
        self.attention = SoftAttention(D, H, config.attention_dim)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.gate = nn.Linear(H, D)  # beta: how much of the context to let in at this step
        self.lstm = nn.LSTMCell(E + D, H)
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            self.out_hidden = nn.Linear(H, E)
            self.out_context = nn.Linear(D, E)
            self.classifier = nn.Linear(E, vocab_size)
        else:
            self.classifier = nn.Linear(H, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)
        nn.init.uniform_(self.classifier.weight, -0.1, 0.1)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        mean = features.mean(dim=1)  # (B, D)
        return {
            "h": self.init_h(mean),  # (B, H)
            "c": self.init_c(mean),  # (B, H)
            "features": features,  # (B, P, D)
            "projected": self.attention.project(features),  # (B, P, A), once per image
        }

    def _advance(self, embedded: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """embedded (B, E) + state -> logits (B, V), next state, alpha (B, P)."""
        features, projected, h, c = state["features"], state["projected"], state["h"], state["c"]
        context, alpha = self.attention(features, projected, h)  # (B, D), (B, P)
        context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))  # (B, H) each
        if self.config.deep_output:
            logits = self.classifier(self.dropout(embedded + self.out_hidden(h) + self.out_context(context)))  # (B, V)
        else:
            logits = self.classifier(self.dropout(h))  # (B, V)
        return logits, {"h": h, "c": c, "features": features, "projected": projected}, alpha

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        return self._advance(self.embedding(tokens), state)  # tokens (B,)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, seq_per_img: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = repeat_state(self.init_state(features), seq_per_img)  # projection done per image, then shared
        steps = (lengths - 1).clamp(min=0)  # (B,) words to predict per caption
        order, inverse = sort_by_length(steps)
        state = {key: value[order] for key, value in state.items()}
        embedded = self.dropout(self.embedding(captions[order]))  # (B, T, E)
        sorted_steps = steps[order].tolist()
        total = sorted_steps[0] if sorted_steps else 0
        batch = captions.shape[0]
        logits = embedded.new_zeros(batch, total, self.vocab_size)  # (B, T-1, V)
        alphas = embedded.new_zeros(batch, total, features.shape[1])  # (B, T-1, P)
        active = batch
        for t in range(total):
            while active > 0 and sorted_steps[active - 1] <= t:
                active -= 1  # rows are sorted by length: finished ones drop off the end
            state = {key: value[:active] for key, value in state.items()}
            step_logits, state, alpha = self._advance(embedded[:active, t], state)
            logits[:active, t] = step_logits
            alphas[:active, t] = alpha
        return logits[inverse], alphas[inverse]
