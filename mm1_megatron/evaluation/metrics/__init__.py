"""Caption and VQA metrics computed as the reference evaluation code computes them."""

from mm1_megatron.evaluation.metrics.cider import cider_d
from mm1_megatron.evaluation.metrics.ptb_tokenizer import ptb_tokenize
from mm1_megatron.evaluation.metrics.vqa import vqa_accuracy, vqa_corpus_accuracy

__all__ = ["cider_d", "ptb_tokenize", "vqa_accuracy", "vqa_corpus_accuracy"]
