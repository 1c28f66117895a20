"""Image-text data: tokenizers, synthetic generator, shards and indexed text, packing, loaders.

Flow: a source builds packed sequences (``PackedSequence``) of one kind: the synthetic
generator, caption or interleaved tar shards, or an indexed text corpus (``sources``);
``MixtureSchedule`` picks the source of each sequence; ``MicroBatchLoader`` shards them
over data-parallel ranks, builds micro-batches in worker processes and saves its
position. ``factory.build_data`` assembles all of it from ``DataConfig``; see
``docs/data.md``.
"""

from mm1_megatron.data.loader import SOURCE_IDS, SyntheticDataLoader, collate
from mm1_megatron.data.packing import PackedSequence, pack_sequence
from mm1_megatron.data.synthetic import Sample, SyntheticGenerator
from mm1_megatron.data.tokenizer import SyntheticTokenizer, Tokenizer

__all__ = [
    "SOURCE_IDS", "SyntheticDataLoader", "collate", "PackedSequence", "pack_sequence",
    "Sample", "SyntheticGenerator", "SyntheticTokenizer", "Tokenizer",
]
