"""Pictures of what a captioning model did: attention maps over the image, word by word."""

from captioner.visualize.attention import (
    attention_figure,
    encoder_view,
    figure_grid,
    save_attention_figure,
    upsample_attention,
)

__all__ = ["attention_figure", "encoder_view", "figure_grid", "save_attention_figure", "upsample_attention"]
