"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap), corpus-level, 0-100."""

from captioner.metrics.coco import METRIC_NAMES, MetricsError, ptb_tokenize, score_captions

__all__ = ["METRIC_NAMES", "MetricsError", "ptb_tokenize", "score_captions"]
