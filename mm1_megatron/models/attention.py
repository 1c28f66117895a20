"""Core attention for packed sequences: causal within each document, never across.

The decoder receives ``document_ids`` (``[b, s]``) where Megatron-Core passes an attention
mask; Megatron hands that tensor through ``GPTModel``, ``TransformerBlock`` and
``SelfAttention`` to the core attention unchanged. Each core attention here turns it into
the form its kernel needs, so no ``[b, 1, s, s]`` mask exists in training:

- ``DocumentAttention`` (local spec; CPU, and GPUs without Transformer Engine): PyTorch's
  ``scaled_dot_product_attention`` with ``is_causal`` on each document, as ``split``
  views of the row (not slices: see ``_per_document``). Its
  memory grows with the longest document, not with ``s``; on CPU it dispatches to the
  flash kernel (see ``tools/bench_attention.py`` for the measurement).
  ``ImageDocumentAttention`` is the same without the causal mask: the native-resolution
  ViT's packed images, whose ids say which image each patch belongs to.
- ``TEDocumentAttention`` (Transformer Engine spec): the batch becomes one THD sequence
  described by ``cu_seqlens`` (Megatron-Core's ``PackedSeqParams``), so TE's fused and
  flash kernels apply; defined only when TE is importable.
- ``DenseMaskAttention``: Megatron-Core's ``DotProductAttention`` with the explicit
  ``[b, 1, s, s]`` per-document causal mask. The reference the tests compare with
  (``model.attention=dense_mask_reference``); never the default.

Both per-document classes read the documents from one layout per micro-batch
(``batch.documents``: spans, ``cu_seqlens`` on the device, the longest document), which
``model_inputs`` computes from the host ids; every layer and the recompute in backward
share it. A decode step (queries shorter than keys: generation with a KV cache) uses
``attention_against_cache`` in both, SDPA with a ``[b, 1, sq, sk]`` mask.

RoPE needs no change: within a document the rotary score depends only on the distance
between positions, so restarting positions per document or not gives the same attention.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mm1_megatron.batch.contract import document_causal_mask
from mm1_megatron.batch.documents import Segments, document_layout
from mm1_megatron.batch.documents import build_cu_seqlens as cu_seqlens
from mm1_megatron.models.context_attention import attend_context_parallel

__all__ = [
    "DenseMaskAttention",
    "DocumentAttention",
    "ImageDocumentAttention",
    "Segments",
    "attention_against_cache",
    "cu_seqlens",
    "decode_against_cache",
    "document_layout",
    "document_segments",
    "te_document_attention_class",
]


def document_segments(document_ids: torch.Tensor) -> Segments:
    """``[b, s]`` document ids -> per row, the ``[start, end)`` span of each document.

    From the micro-batch's cached layout (``batch.documents``): computed once per
    micro-batch, from the host copy that ``model_inputs`` registered, and shared by every
    layer and by the recompute in backward."""
    return document_layout(document_ids).segments


def attention_against_cache(
    q, k, v, document_ids, *, softmax_scale: float, grouped: bool
) -> torch.Tensor:
    """``[b, heads, s, d]``: the last ``sq`` of ``sk`` positions (generation with a KV
    cache) attend to every earlier key of their own document. The mask is
    ``[b, 1, sq, sk]``: one row per new token, never ``sk x sk``.

    ``document_ids`` may also be that boolean mask itself (True: may attend), which a
    caller running many layers builds once per step instead of once per layer
    (``mm1_megatron.inference.runner``); a 0-dimensional one (True) says that no key is
    hidden from any query, and attention then runs without a mask."""
    sq, sk = q.shape[2], k.shape[2]
    if document_ids is not None and document_ids.dtype == torch.bool:
        mask = document_ids if document_ids.dim() else None
        if mask is not None and mask.shape[2:] != (sq, sk):
            raise ValueError(
                f"a ready mask for {sq} new positions against {sk} cached ones is "
                f"[b, 1, {sq}, {sk}], not {list(mask.shape)}"
            )
    elif document_ids is None or document_ids.shape[-1] != sk:
        raise ValueError(
            f"decoding {sq} new positions against {sk} cached ones needs the document "
            f"ids of all {sk} positions"
        )
    else:
        positions = torch.arange(sk, device=q.device)
        causal = positions[None, :] <= positions[sk - sq :, None]  # [sq, sk]
        same_document = document_ids[:, sk - sq :, None] == document_ids[:, None, :]
        mask = (same_document & causal)[:, None]  # [b, 1, sq, sk]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=grouped
    )


def decode_against_cache(
    query, key, value, document_ids, softmax_scale: Optional[float]
) -> torch.Tensor:
    """``attention_against_cache`` in Megatron's layout: ``[s, b, heads, d]`` in,
    ``[sq, b, heads * d]`` out. ``softmax_scale=None`` is ``1 / sqrt(d)``."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(query.shape[-1])
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    grouped = q.shape[1] != k.shape[1]
    context = attention_against_cache(
        q, k, v, document_ids, softmax_scale=softmax_scale, grouped=grouped
    )
    sq, b = query.shape[0], query.shape[1]
    return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _rows(tensor: torch.Tensor):
    """``[s, b, ...]`` -> each row's ``[s, ...]`` view (a squeeze for one row: no copy in
    backward, where ``unbind``'s is a ``stack``)."""
    return (tensor.squeeze(1),) if tensor.shape[1] == 1 else tensor.unbind(1)


def _documents(row: torch.Tensor, lengths):
    """A row's documents as views; one document is the row itself (no split to undo)."""
    return row.split(lengths) if len(lengths) > 1 else (row,)


class DocumentAttention(DotProductAttention):
    """Per-document causal ``scaled_dot_product_attention``; no ``s x s`` mask.

    ``attention_mask`` is the ``[b, s]`` document ids. ``None`` (the ViT, whose layers are
    built with ``no_mask``) means one bidirectional document per row.
    """

    causal_within_documents = True

    def __init__(self, config, *args, **kwargs):
        if config.context_parallel_size == 1:
            super().__init__(config, *args, **kwargs)
            return
        # Megatron-Core's DotProductAttention refuses context parallelism (only its TE
        # attention has it); ``forward`` here has its own, so the parent is built without.
        without_cp = copy.copy(config)
        without_cp.context_parallel_size = 1
        super().__init__(without_cp, *args, **kwargs)
        self.config = config

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
        sq, b = query.shape[0], query.shape[1]
        grouped = query.shape[2] != key.shape[2]
        dropout = self.attention_dropout.p if self.training else 0.0
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None and sq == key.shape[0]:  # packed training / prefill
            layout = document_layout(attention_mask)
            if layout.context is not None:
                if not self.causal_within_documents:
                    raise AssertionError("context parallelism splits causal decoders only")
                with self._dropout_rng(dropout):
                    return attend_context_parallel(
                        query,
                        key,
                        value,
                        layout,
                        group=parallel_state.get_context_parallel_group(),
                        softmax_scale=self.softmax_scale,
                        dropout=dropout,
                    )
            if layout.seq_len != sq or len(layout.segments) != b:
                raise ValueError(
                    f"document ids of shape {list(attention_mask.shape)} do not match the "
                    f"queries' {b} rows of {sq} positions"
                )
            with self._dropout_rng(dropout):
                context = self._per_document(query, key, value, layout.segments, dropout, grouped)
            return context.reshape(sq, b, self.hidden_size_per_partition)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with self._dropout_rng(dropout):
            if q.shape[2] != k.shape[2]:  # decoding: new queries against cached keys
                context = attention_against_cache(
                    q, k, v, attention_mask, softmax_scale=self.softmax_scale, grouped=grouped
                )
            else:  # attention_mask is None
                context = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    dropout_p=dropout,
                    scale=self.softmax_scale,
                    is_causal=mask_type == AttnMaskType.causal,
                    enable_gqa=grouped,
                )
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _per_document(
        self, query, key, value, segments: Segments, dropout: float, grouped: bool
    ) -> torch.Tensor:
        """``[s, b, heads, d]`` in and out: attention within each document.

        The documents are ``split`` views and the outputs one ``cat`` per row, so backward
        writes each input's gradient once per row (``SplitBackward`` is one ``cat``), and
        once more to ``stack`` the rows when there are several. Slicing each document
        instead made every slice's backward allocate, zero-fill and add a full-size
        gradient: O(documents x s) memory traffic (issue 26). Single rows and single
        documents skip the split and the cat, whose backward would copy."""
        # Per row, a (q, k, v) triple of [s, heads, d] views.
        rows = zip(*(_rows(t) for t in (query, key, value)))
        outputs = []
        for spans, (q, k, v) in zip(segments, rows):
            lengths = [end - start for start, end in spans]
            pieces = [
                self._one_document(*document, dropout, grouped)
                for document in zip(*(_documents(t, lengths) for t in (q, k, v)))
            ]
            outputs.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        if len(outputs) == 1:
            return outputs[0].unsqueeze(1)
        return torch.stack(outputs, dim=1)

    def _one_document(self, q, k, v, dropout: float, grouped: bool) -> torch.Tensor:
        """One document, ``[len, heads, d]`` in and out, through SDPA's ``[1, heads, len, d]``."""
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            is_causal=self.causal_within_documents,
            scale=self.softmax_scale,
            enable_gqa=grouped,
        )
        return context.squeeze(0).transpose(0, 1)

    def _dropout_rng(self, dropout: float):
        """Attention dropout draws from the tensor-parallel RNG stream, as Megatron's does."""
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


class ImageDocumentAttention(DocumentAttention):
    """``DocumentAttention`` without the causal mask: the native-resolution ViT's packed
    images (``attention_mask``: each patch's image index), where every patch attends to
    all patches of its own image and to none of another's."""

    causal_within_documents = False


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
        THD, which TE's varlen kernels need, and the ViT's ``no_mask`` into ``padding``:
        the same class is the native-resolution ViT's per-image bidirectional attention.

        Under context parallelism ``MM1Model`` hands Megatron-Core its own packed
        sequences (``context_attention.thd_packed_seq_params``): the queries arrive as
        this rank's THD share and go to TE's context-parallel attention as they are.
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
            if packed_seq_params is not None:  # context parallelism: MM1Model's THD row
                return super().forward(
                    query,
                    key,
                    value,
                    None,
                    mask_type,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                    **kwargs,
                )
            if attention_mask is None:  # one document per row: TE's own sbhd path
                return super().forward(
                    query, key, value, None, mask_type, attention_bias=attention_bias, **kwargs
                )
            sq, b = query.shape[0], query.shape[1]
            if key.shape[0] != sq:  # decoding against the KV cache: the local layer's SDPA
                if attention_bias is not None:
                    raise NotImplementedError("decoding with an attention bias")
                # TE's DotProductAttention hands its scale (1/sqrt(d) when None) to each
                # backend, which keeps it as ``softmax_scale`` (TE 2.x attention/
                # dot_product_attention/dot_product_attention.py __init__, backends.py).
                backend = getattr(self, "unfused_attention", self)
                scale = getattr(backend, "softmax_scale", None)
                return decode_against_cache(query, key, value, attention_mask, scale)
            layout = document_layout(attention_mask)  # once per micro-batch, cached
            if layout.seq_len != sq:
                raise ValueError(f"document ids cover {layout.seq_len} positions, the queries {sq}")
            params = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=layout.cu_seqlens,
                cu_seqlens_kv=layout.cu_seqlens,
                max_seqlen_q=layout.max_seqlen,
                max_seqlen_kv=layout.max_seqlen,
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
