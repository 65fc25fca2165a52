"""Decoding: one batched ``generate`` for greedy, beam search and sampling."""

from captioner.decoding.generate import Caption, GenerationConfig, generate, length_penalty

__all__ = ["Caption", "GenerationConfig", "generate", "length_penalty"]
