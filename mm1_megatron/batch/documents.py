"""Where each packed document lies in a micro-batch: built once, on the host, per micro-batch.

Every decoder layer's core attention needs the documents' spans (``segments``) and, for
Transformer Engine's THD kernels, ``cu_seqlens`` on the device. ``model_inputs`` moves
the host batch to the device and registers the layout computed from the host ids for the
device ids (``register_host_document_ids``), so training never reads ids back from the
device. ``document_layout`` finds it for every layer, and for the recompute in backward,
which gets detached copies of the ids (same storage and version counter). Ids that were
not registered (generation, tests) are read to the host once and cached the same way.

Here rather than in ``models``, so ``model_inputs`` may register layouts: ``batch``
imports neither ``models`` nor ``data``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from mm1_megatron.batch.context_parallel import ContextShard

Segments = List[List[Tuple[int, int]]]  # per batch row: (start, end) of each document

# Layouts kept, least recently used dropped first. 1F1B on the first of p pipeline stages
# runs up to p forwards before the backward (and recompute) of the oldest; later stages
# fewer; forward-only evaluation one. 32 covers p <= 32 (this trainer has no interleaved
# schedule) at a few KB per entry: the [b, s] ids it holds, cu_seqlens and the span lists.
MAX_LAYOUTS = 32


@dataclass(frozen=True)
class DocumentLayout:
    """The documents of a ``[b, s]`` micro-batch, flattened row by row for ``cu_seqlens``."""

    segments: Segments
    cu_seqlens: torch.Tensor  # int32 [num_documents + 1], on the ids' device
    max_seqlen: int  # the longest document
    seq_len: int
    # Under context parallelism, the share of each row this rank's decoder holds: the ids
    # (and these spans) cover the whole row, the decoder's activations only its share.
    context: Optional[ContextShard] = None


def compute_segments(host_ids: torch.Tensor) -> Segments:
    """``[b, s]`` host ids -> per row, the ``[start, end)`` span of each document.

    Documents are contiguous runs of one id (the packing contract)."""
    seq_len = host_ids.shape[1]
    starts = torch.ones_like(host_ids, dtype=torch.bool)
    starts[:, 1:] = host_ids[:, 1:] != host_ids[:, :-1]
    segments = []
    for row in starts:
        begin = row.nonzero().flatten().tolist()
        segments.append(list(zip(begin, begin[1:] + [seq_len])))
    return segments


def build_cu_seqlens(segments: Segments, seq_len: int, device) -> Tuple[torch.Tensor, int]:
    """Cumulative document lengths over the batch flattened row by row, and the longest.

    Built on the host and moved with one copy: pinned and ``non_blocking`` for CUDA, so
    the host does not wait (the caching host allocator keeps the pinned block until the
    copy is done)."""
    bounds = [0]
    longest = 0
    for row, spans in enumerate(segments):
        for start, end in spans:
            bounds.append(row * seq_len + end)
            longest = max(longest, end - start)
    device = torch.device(device)
    host = torch.tensor(bounds, dtype=torch.int32, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True), longest


def _check_ids(document_ids: torch.Tensor) -> None:
    if document_ids.dim() != 2 or document_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"packed-sequence attention needs document ids of shape [b, s] "
            f"(integers); got {tuple(document_ids.shape)} {document_ids.dtype}. "
            f"Build the inputs with mm1_megatron.batch.model_inputs"
        )


def _layout(host_ids: torch.Tensor, device, context: Optional[ContextShard] = None):
    segments = compute_segments(host_ids)
    seq_len = host_ids.shape[1]
    cu_seqlens, longest = build_cu_seqlens(segments, seq_len, device)
    return DocumentLayout(segments, cu_seqlens, longest, seq_len, context)


class _LayoutCache:
    """Layouts by the ids tensor's memory: detached views (the recompute's inputs) hit.

    The key is (address, shape, strides, dtype, device, version), and a hit also needs
    the very same storage object (torch keeps one Python object per storage; were it two,
    the lookup would miss, never return a wrong layout): each entry holds its ids, so
    while cached no new allocation can take their address, and ids that merely share the
    address (one buffer wrapped twice by ``torch.from_numpy``) miss. An in-place write
    bumps the version counter, which detached views share.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()  # key -> (ids, layout)

    @staticmethod
    def _key(ids: torch.Tensor):
        return (ids.data_ptr(), ids.shape, ids.stride(), ids.dtype, ids.device, ids._version)

    def get(self, ids: torch.Tensor):
        key = self._key(ids)
        entry = self._entries.get(key)
        if entry is None or entry[0].untyped_storage() is not ids.untyped_storage():
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, ids: torch.Tensor, layout: DocumentLayout) -> None:
        key = self._key(ids)
        self._entries[key] = (ids, layout)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


_CACHE = _LayoutCache(MAX_LAYOUTS)


def register_host_document_ids(
    device_ids: torch.Tensor, host_ids: torch.Tensor, context: Optional[ContextShard] = None
):
    """The layout of ``host_ids``, cached for their device copy ``device_ids``, with this
    rank's ``context`` share of each row under context parallelism.

    Ids that are not ``[b, s]`` integers are left alone (the attention refuses them)."""
    if device_ids.shape != host_ids.shape or host_ids.device.type != "cpu":
        raise AssertionError("register the host copy of the same ids")
    if host_ids.dim() != 2 or host_ids.dtype not in (torch.int32, torch.int64):
        return None
    if device_ids.is_inference():  # no version counter to key on
        if context is not None:
            raise AssertionError("context-parallel inputs must not be inference tensors")
        return None
    if context is not None and context.seq_length != host_ids.shape[1]:
        raise AssertionError(f"a share of {context.seq_length}-token rows for {host_ids.shape}")
    layout = _layout(host_ids, device_ids.device, context)
    _CACHE.put(device_ids, layout)
    return layout


def document_layout(document_ids: torch.Tensor) -> DocumentLayout:
    """The cached layout of ``[b, s]`` ids; reads unregistered ids to the host once."""
    _check_ids(document_ids)
    if document_ids.is_inference():
        return _layout(document_ids.cpu(), document_ids.device)
    layout = _CACHE.get(document_ids)
    if layout is None:
        layout = _layout(document_ids.cpu(), document_ids.device)
        _CACHE.put(document_ids, layout)
    return layout
