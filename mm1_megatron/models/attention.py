"""Core attention for packed sequences: causal within each document, never across.

The decoder receives ``document_ids`` (``[b, s]``) where Megatron-Core passes an attention
mask; Megatron hands that tensor through ``GPTModel``, ``TransformerBlock`` and
``SelfAttention`` to the core attention unchanged. Each core attention here turns it into
the form its kernel needs, so no ``[b, 1, s, s]`` mask exists in training:

- ``DocumentAttention`` (local spec; CPU, and GPUs without Transformer Engine): PyTorch's
  ``scaled_dot_product_attention`` with ``is_causal`` on each document's slice. Its
  memory grows with the longest document, not with ``s``; on CPU it dispatches to the
  flash kernel (see ``tools/bench_attention.py`` for the measurement).
- ``TEDocumentAttention`` (Transformer Engine spec): the batch becomes one THD sequence
  described by ``cu_seqlens`` (Megatron-Core's ``PackedSeqParams``), so TE's fused and
  flash kernels apply; defined only when TE is importable.
- ``DenseMaskAttention``: Megatron-Core's ``DotProductAttention`` with the explicit
  ``[b, 1, s, s]`` per-document causal mask. The reference the tests compare with
  (``model.attention=dense_mask_reference``); never the default.

RoPE needs no change: within a document the rotary score depends only on the distance
between positions, so restarting positions per document or not gives the same attention.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mm1_megatron.batch.contract import document_causal_mask

Segments = List[List[Tuple[int, int]]]  # per batch row: (start, end) of each document


def document_segments(document_ids: torch.Tensor) -> Segments:
    """``[b, s]`` document ids -> per row, the ``[start, end)`` span of each document.

    Documents are contiguous runs of one id (the packing contract). Reads the ids on the
    host: one device sync per micro-batch on GPU, shared by all layers (cached).
    """
    return _SEGMENT_CACHE.get(document_ids)


class _OneEntryCache:
    """Every layer of a forward pass gets the same ``document_ids`` tensor: compute once.

    Keyed on the tensor object itself (a weak reference) and its version counter, never on
    its address: the next micro-batch's ids may be allocated where the last ones were.
    """

    def __init__(self):
        self._tensor: Optional[weakref.ref] = None
        self._version = -1
        self._value: Optional[Segments] = None

    def get(self, document_ids: torch.Tensor) -> Segments:
        cached = self._tensor() if self._tensor is not None else None
        if cached is not document_ids or document_ids._version != self._version:
            self._value = _compute_segments(document_ids)
            self._tensor, self._version = weakref.ref(document_ids), document_ids._version
        return self._value


def _compute_segments(document_ids: torch.Tensor) -> Segments:
    if document_ids.dim() != 2 or document_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"packed-sequence attention needs document ids of shape [b, s] "
            f"(integers); got {tuple(document_ids.shape)} {document_ids.dtype}. "
            f"Build the inputs with mm1_megatron.batch.model_inputs"
        )
    ids = document_ids.cpu()
    seq_len = ids.shape[1]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    segments = []
    for row in starts:
        begin = row.nonzero().flatten().tolist()
        segments.append(list(zip(begin, begin[1:] + [seq_len])))
    return segments


_SEGMENT_CACHE = _OneEntryCache()


def cu_seqlens(segments: Segments, seq_len: int, device) -> Tuple[torch.Tensor, int]:
    """Cumulative document lengths over the batch flattened row by row, and the longest."""
    bounds = [0]
    longest = 0
    for row, spans in enumerate(segments):
        for start, end in spans:
            bounds.append(row * seq_len + end)
            longest = max(longest, end - start)
    return torch.tensor(bounds, dtype=torch.int32, device=device), longest


class DocumentAttention(DotProductAttention):
    """Per-document causal ``scaled_dot_product_attention``; no ``s x s`` mask.

    ``attention_mask`` is the ``[b, s]`` document ids. ``None`` (the ViT, whose layers are
    built with ``no_mask``) means one bidirectional document per row.
    """

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "DocumentAttention takes document ids, not packed "
                "sequence parameters or an attention bias"
            )
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        grouped = q.shape[1] != k.shape[1]
        dropout = self.attention_dropout.p if self.training else 0.0
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        with self._dropout_rng(dropout):
            if q.shape[2] != k.shape[2]:  # decoding: new queries against cached keys
                context = self._against_cache(q, k, v, attention_mask, grouped)
            elif attention_mask is None:
                context = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    dropout_p=dropout,
                    scale=self.softmax_scale,
                    is_causal=mask_type == AttnMaskType.causal,
                    enable_gqa=grouped,
                )
            else:
                context = self._per_document(
                    q, k, v, document_segments(attention_mask), dropout, grouped
                )
        # [b, heads, s, d] -> [s, b, heads * d]
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _per_document(
        self, q, k, v, segments: Segments, dropout: float, grouped: bool
    ) -> torch.Tensor:
        rows = []
        for row, spans in enumerate(segments):
            pieces = [
                F.scaled_dot_product_attention(
                    q[row : row + 1, :, start:end],
                    k[row : row + 1, :, start:end],
                    v[row : row + 1, :, start:end],
                    dropout_p=dropout,
                    is_causal=True,
                    scale=self.softmax_scale,
                    enable_gqa=grouped,
                )
                for start, end in spans
            ]
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)

    def _against_cache(self, q, k, v, document_ids, grouped: bool) -> torch.Tensor:
        """The last ``sq`` of ``sk`` positions (generation with a KV cache) attend to every
        earlier key of their own document. The mask is ``[b, 1, sq, sk]``: one row per new
        token, never ``sk x sk``."""
        sq, sk = q.shape[2], k.shape[2]
        if document_ids is None or document_ids.shape[-1] != sk:
            raise ValueError(
                f"decoding {sq} new positions against {sk} cached ones needs the document "
                f"ids of all {sk} positions"
            )
        positions = torch.arange(sk, device=q.device)
        causal = positions[None, :] <= positions[sk - sq :, None]  # [sq, sk]
        same_document = document_ids[:, sk - sq :, None] == document_ids[:, None, :]
        mask = (same_document & causal)[:, None]  # [b, 1, sq, sk]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=grouped
        )

    def _dropout_rng(self, dropout: float):
        """Attention dropout draws from the tensor-parallel RNG stream, as Megatron's does."""
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


class DenseMaskAttention(DotProductAttention):
    """The reference: Megatron-Core's attention with the explicit ``[b, 1, s, s]`` mask."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_mask is not None:
            attention_mask = document_causal_mask(attention_mask)
        return super().forward(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=attn_mask_type,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
        )


def te_document_attention_class():
    """``TEDocumentAttention``, built on Megatron-Core's TE attention (needs TE)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.packed_seq_params import PackedSeqParams

    class TEDocumentAttention(TEDotProductAttention):
        """Document ids -> one THD sequence with ``cu_seqlens``: TE's flash/fused kernels.

        Megatron-Core turns the layer's ``causal`` mask type into ``padding_causal`` for
        THD, which TE's varlen kernels need.
        """

        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
            **kwargs,
        ):
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            if attention_mask is None:  # one document per row: TE's own sbhd path
                return super().forward(
                    query, key, value, None, mask_type, attention_bias=attention_bias, **kwargs
                )
            sq, b = query.shape[0], query.shape[1]
            if key.shape[0] != sq:
                raise NotImplementedError(
                    "generation with a KV cache is written for the local layer spec only "
                    "(model.transformer_impl=local), not yet for Transformer Engine's "
                    "packed attention"
                )
            cu, longest = cu_seqlens(document_segments(attention_mask), sq, query.device)
            params = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=longest,
                max_seqlen_kv=longest,
            )
            # [s, b, heads, d] -> [b * s, heads, d]: row by row, as cu_seqlens counts.
            q, k, v = (t.transpose(0, 1).reshape(b * sq, *t.shape[2:]) for t in (query, key, value))
            context = super().forward(
                q,
                k,
                v,
                None,
                mask_type,
                attention_bias=attention_bias,
                packed_seq_params=params,
                **kwargs,
            )
            return context.reshape(b, sq, -1).transpose(0, 1).contiguous()

    return TEDocumentAttention
