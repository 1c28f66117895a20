"""Text-only corpora as Megatron-Core indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``).

``build_text_index`` tokenizes documents into ``<bos> text <eos>`` (one sequence per
document) with ``IndexedDatasetBuilder``, in parts of ``docs_per_part`` documents under
``<prefix>.parts/`` that are merged at the end, so an interrupted build resumes at the
first unfinished part. ``<prefix>.meta.json`` records the tokenizer's fingerprint.

``TextCorpus`` reads one or more such prefixes (also ones made by Megatron-LM's
``preprocess_data.py``, taken as they are: a document is the concatenation of its
sequences) as one list of documents, and serves *chunks*: each epoch lays the
documents end to end in a shuffled order and cuts the stream every ``seq_length``
tokens. The shuffle keeps runs of ``DOC_BLOCK`` consecutive documents together (their
order inside a run is shuffled too), so memory is 4 bytes per document plus 8 per run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.data.tokenizers.text import tokenizer_fingerprint
from mm1_megatron.utils.progress import ProgressLine

logger = logging.getLogger(__name__)

DOC_BLOCK = 256
TEXT_STREAM = 2  # SOURCE_IDS["text"]: keeps text shuffles apart from other streams
_CACHE_SIZE = 64


def _indexed_dataset():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def build_text_index(
    texts: Iterable[str],
    out_prefix: Union[str, Path],
    tokenizer: Tokenizer,
    *,
    docs_per_part: int = 100_000,
    total: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, int]:
    """Write ``<out_prefix>.bin/.idx/.meta.json``; returns document and token counts."""
    ix = _indexed_dataset()
    out_prefix = Path(out_prefix)
    parts_dir = Path(f"{out_prefix}.parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    done = sorted(parts_dir.glob("part-*.idx"))
    dtype = _token_dtype(tokenizer.vocab_size)
    bar = ProgressLine("text index", total, unit="docs") if progress else None
    skip = len(done) * docs_per_part
    if skip:
        logger.info("resuming: %d finished parts cover the first %d documents", len(done), skip)
    builder, part_docs, counts = None, 0, {"documents": 0, "tokens": 0, "empty": 0}
    dropped = {tokenizer.image_token_id, tokenizer.pad_token_id}  # see records.py
    for position, text in enumerate(texts):
        if position < skip:
            continue
        if builder is None:
            builder = ix.IndexedDatasetBuilder(
                str(parts_dir / f"part-{len(done):05d}.bin.tmp"), dtype=dtype
            )
        ids = [token for token in tokenizer.encode(text) if token not in dropped]
        if not ids:
            counts["empty"] += 1
        document = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        builder.add_document(np.asarray(document, dtype=dtype), [len(document)])
        part_docs += 1
        if part_docs == docs_per_part:
            done.append(_finish_part(builder, parts_dir, len(done)))
            builder, part_docs = None, 0
        if bar is not None:
            bar.update(1)
    if builder is not None:
        done.append(_finish_part(builder, parts_dir, len(done)))
    if bar is not None:
        bar.close()
    merged = ix.IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
    for part in done:
        merged.add_index(str(part.with_suffix("")))
    merged.finalize(f"{out_prefix}.idx")
    corpus = ix.IndexedDataset(str(out_prefix))
    counts["documents"] = len(corpus.document_indices) - 1
    counts["tokens"] = int(np.asarray(corpus.sequence_lengths, dtype=np.int64).sum())
    meta = {"tokenizer": tokenizer_fingerprint(tokenizer), **counts}
    Path(f"{out_prefix}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(parts_dir)
    return counts


def _finish_part(builder, parts_dir: Path, number: int) -> Path:
    """Finalize a part under temporary names, then rename: a part exists only when whole."""
    stem = parts_dir / f"part-{number:05d}"
    builder.finalize(f"{stem}.idx.tmp")
    Path(f"{stem}.bin.tmp").rename(f"{stem}.bin")
    Path(f"{stem}.idx.tmp").rename(f"{stem}.idx")
    return Path(f"{stem}.idx")


def check_text_meta(prefix: str, tokenizer: Tokenizer) -> None:
    """``ValueError`` when ``<prefix>.meta.json`` names a different tokenizer."""
    meta_path = Path(f"{prefix}.meta.json")
    if not meta_path.exists():
        logger.warning(
            "%s has no .meta.json (not built by `mm1 data text-index`): "
            "cannot check that it was tokenized with this tokenizer",
            prefix,
        )
        return
    saved = json.loads(meta_path.read_text())["tokenizer"]
    current = tokenizer_fingerprint(tokenizer)
    for key in ("vocab_size", "special_ids", "sha256"):
        if key in saved and key in current and saved[key] != current[key]:
            raise ValueError(
                f"text corpus {prefix} was tokenized with another tokenizer "
                f"({key} {saved[key]} vs {current[key]}); rebuild it with "
                f"`mm1 data text-index` and this data.tokenizer.path"
            )


class TextCorpus:
    """Documents of several indexed datasets as one list; chunks by (seed, epoch, index)."""

    def __init__(self, prefixes: Sequence[str], *, seq_length: int, seed: int):
        ix = _indexed_dataset()
        if not prefixes:
            raise ValueError("a text corpus needs at least one indexed-dataset prefix")
        self.prefixes = [str(p) for p in prefixes]
        for prefix in self.prefixes:
            if not ix.IndexedDataset.exists(prefix):
                raise ValueError(
                    f"no indexed dataset at {prefix} (.bin and .idx); build one "
                    f"with `mm1 data text-index`"
                )
        self.seq_length, self.seed = seq_length, seed
        self._datasets = [ix.IndexedDataset(prefix) for prefix in self.prefixes]
        lengths = [self._document_lengths(ds) for ds in self._datasets]
        self.doc_offsets = np.cumsum([0] + [len(doc_lengths) for doc_lengths in lengths])
        self.doc_lengths = np.concatenate(lengths).astype(np.int32)
        self.num_documents = len(self.doc_lengths)
        starts = np.arange(0, self.num_documents, DOC_BLOCK)
        self.block_tokens = (
            np.add.reduceat(self.doc_lengths.astype(np.int64), starts)
            if self.num_documents
            else np.zeros(0, dtype=np.int64)
        )
        self.tokens_per_epoch = int(self.block_tokens.sum())
        if self.tokens_per_epoch == 0:
            raise ValueError(f"text corpora {self.prefixes} hold no tokens")
        self.chunks_per_epoch = -(-self.tokens_per_epoch // seq_length)
        self._epochs: OrderedDict[int, Tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._blocks: OrderedDict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @staticmethod
    def _document_lengths(dataset) -> np.ndarray:
        sequence_ends = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
        doc_index = np.asarray(dataset.document_indices, dtype=np.int64)
        return sequence_ends[doc_index[1:]] - sequence_ends[doc_index[:-1]]

    def chunk(self, index: int) -> List[Tuple[int, np.ndarray]]:
        """Chunk ``index`` (over all epochs): ``(document, tokens)`` pieces, in order."""
        epoch, chunk = divmod(index, self.chunks_per_epoch)
        block_order, block_ends = self._epoch(epoch)
        position = chunk * self.seq_length
        end = min(position + self.seq_length, self.tokens_per_epoch)
        pieces = []
        slot = int(np.searchsorted(block_ends, position, side="right"))
        while position < end:
            block = int(block_order[slot])
            docs, doc_ends = self._block(epoch, block)
            block_start = int(block_ends[slot] - doc_ends[-1])
            inner = int(np.searchsorted(doc_ends, position - block_start, side="right"))
            while inner < len(docs) and position < end:
                doc = int(docs[inner])
                doc_start = block_start + int(doc_ends[inner] - self.doc_lengths[doc])
                take = min(end, block_start + int(doc_ends[inner])) - position
                if take > 0:
                    pieces.append((doc, self._read(doc, position - doc_start, take)))
                position += max(take, 0)
                inner += 1
            slot += 1
        return pieces

    def _epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, TEXT_STREAM, epoch]).permutation(
                len(self.block_tokens)
            )
            self._epochs[epoch] = (order, np.cumsum(self.block_tokens[order]))
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _block(self, epoch: int, block: int) -> Tuple[np.ndarray, np.ndarray]:
        key = (epoch, block)
        if key not in self._blocks:
            first = block * DOC_BLOCK
            size = min(DOC_BLOCK, self.num_documents - first)
            rng = np.random.default_rng([self.seed, TEXT_STREAM, epoch, block])
            docs = first + rng.permutation(size)
            self._blocks[key] = (docs, np.cumsum(self.doc_lengths[docs], dtype=np.int64))
            while len(self._blocks) > _CACHE_SIZE:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return self._blocks[key]

    def _read(self, doc: int, offset: int, length: int) -> np.ndarray:
        which = int(np.searchsorted(self.doc_offsets, doc, side="right")) - 1
        dataset = self._datasets[which]
        local = doc - int(self.doc_offsets[which])
        first, last = int(dataset.document_indices[local]), int(dataset.document_indices[local + 1])
        if last - first == 1:
            return np.asarray(dataset.get(first, offset=offset, length=length), dtype=np.int64)
        tokens = np.concatenate(dataset[first:last])
        return tokens[offset : offset + length].astype(np.int64)
