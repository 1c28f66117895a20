"""Caption and VQA metrics computed as the reference evaluation code computes them."""

from mm1_megatron.evaluation.metrics.cider import cider_d
from mm1_megatron.evaluation.metrics.ptb_tokenizer import ptb_tokenize

__all__ = ["cider_d", "ptb_tokenize"]
