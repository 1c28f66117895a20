"""Image-text data, by concern:

- ``tokenizers/``: the tokenizer interface and the synthetic word-level vocabulary
  (``base``), SentencePiece and Hugging Face tokenizers (``text``).
- ``shards/``: what lives on disk. Tar shards and their manifests (``reader``), sample
  records (``records``), the shard writer (``writer``), ingest of COCO / LLaVA / OBELICS /
  img2dataset layouts (``ingest``), indexed text corpora (``text_index``), bad-sample
  accounting (``skips``).
- ``synthetic/``: the embedded synthetic world (``world``) and its sequence builder
  (``sequences``), so training runs with no downloads.
- ``pipeline/``: from samples to micro-batches. Packing (``packing``), the source mixture
  (``mixture``), shard and text sources (``sources``), image decoding (``images``), and
  the one loader (``loader.MicroBatchLoader``) that shards sequences over data-parallel
  ranks, prefetches in workers and saves its position, for every source.
- ``build.build_data`` assembles all of it from ``DataConfig``; see ``docs/data.md``.

Data imports neither ``models`` nor ``training``; the micro-batch contract it shares with
the models lives in ``mm1_megatron.batch``.
"""

from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.loader import BATCH_KEYS, MicroBatchLoader, collate
from mm1_megatron.data.pipeline.mixture import SOURCE_IDS
from mm1_megatron.data.pipeline.packing import PackedSequence, Sample, pack_sequence
from mm1_megatron.data.synthetic.sequences import SyntheticSequences
from mm1_megatron.data.synthetic.world import SyntheticGenerator
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer, Tokenizer

__all__ = [
    "BATCH_KEYS",
    "MicroBatchLoader",
    "PackedSequence",
    "SOURCE_IDS",
    "Sample",
    "SyntheticGenerator",
    "SyntheticSequences",
    "SyntheticTokenizer",
    "Tokenizer",
    "build_data",
    "collate",
    "pack_sequence",
]
