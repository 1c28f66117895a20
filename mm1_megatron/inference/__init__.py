"""Generation on the Megatron model: prompts, a KV-cached forward at any TP/PP/EP layout,
greedy and beam search."""

from mm1_megatron.inference.generate import GenerationConfig, generate
from mm1_megatron.inference.prompts import Prompt

__all__ = ["GenerationConfig", "Prompt", "generate"]
