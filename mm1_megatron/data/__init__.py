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
  (``mixture``), shard sources (``sources``, their costs in ``source_costs``), the text
  source and the mixture builder (``text_and_mixture``), image decoding (``images``),
  balanced placement of each global batch (``balance``), and the one loader
  (``loader.MicroBatchLoader``) that shards sequences over data-parallel ranks,
  prefetches in workers and saves its position, for every source.
- ``build.build_data`` assembles all of it from ``DataConfig``; see ``docs/data.md``.

Data imports neither ``models`` nor ``training``; the micro-batch contract it shares with
the models lives in ``mm1_megatron.batch``.

Exports resolve lazily, so the command line (``mm1 data``) reads its options without
loading torch.
"""

from mm1_megatron.utils.lazy import lazy_getattr

_EXPORTS = {
    "build_data": "mm1_megatron.data.build",
    "BATCH_KEYS": "mm1_megatron.data.pipeline.loader",
    "NATIVE_BATCH_KEYS": "mm1_megatron.data.pipeline.loader",
    "NativeResolution": "mm1_megatron.data.pipeline.native_resolution",
    "MicroBatchLoader": "mm1_megatron.data.pipeline.loader",
    "collate": "mm1_megatron.data.pipeline.loader",
    "SOURCE_IDS": "mm1_megatron.data.pipeline.mixture",
    "PackedSequence": "mm1_megatron.data.pipeline.packing",
    "Sample": "mm1_megatron.data.pipeline.packing",
    "pack_sequence": "mm1_megatron.data.pipeline.packing",
    "SyntheticSequences": "mm1_megatron.data.synthetic.sequences",
    "SyntheticGenerator": "mm1_megatron.data.synthetic.world",
    "SyntheticTokenizer": "mm1_megatron.data.tokenizers.base",
    "Tokenizer": "mm1_megatron.data.tokenizers.base",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
