"""Synthetic image-text data: tokenizer, sample generator, sequence packing, loader.

Flow: ``SyntheticGenerator`` draws ``Sample``s of one source, ``pack_sequence`` turns
them into one fixed-length ``PackedSequence``, ``SyntheticDataLoader`` mixes sources and
stacks sequences into micro-batches. Only synthetic data exists so far; real datasets
would plug in as other ``Sample`` streams.
"""

from mm1_megatron.data.loader import SOURCE_IDS, SyntheticDataLoader, collate
from mm1_megatron.data.packing import PackedSequence, pack_sequence
from mm1_megatron.data.synthetic import Sample, SyntheticGenerator
from mm1_megatron.data.tokenizer import SyntheticTokenizer, Tokenizer

__all__ = [
    "SOURCE_IDS", "SyntheticDataLoader", "collate", "PackedSequence", "pack_sequence",
    "Sample", "SyntheticGenerator", "SyntheticTokenizer", "Tokenizer",
]
