"""``te.pytorch.DotProductAttention`` on CPU with ``torch`` SDPA, after TE v2.14
``attention/dot_product_attention/dot_product_attention.py``.

Constructor: the v2.14 keywords (dot_product_attention.py:323-346); sliding windows,
softmax variants and max-logit output are refused, and context parallelism other than
``cp_comm_type="p2p"`` over THD batches (``context_parallel.py``).
Forward: the v2.14 keywords (:806-830) and layouts

- ``sbhd`` ``[s, b, h, d]`` -> ``[s, b, h*d]``; ``bshd`` ``[b, s, h, d]`` -> ``[b, s, h*d]``;
  mask types ``no_mask``, ``causal``, ``causal_bottom_right``, and ``padding`` /
  ``padding_causal`` with a boolean ``attention_mask`` ``[b, 1, 1, s]`` where True means
  "masked out" (TE's convention);
- ``thd`` ``[t, h, d]`` -> ``[t, h*d]``: each ``cu_seqlens`` segment attends only to itself,
  with the THD asserts of :1133-1162 (3-D tensors, a ``padding*`` mask type, int32
  ``[batch + 1]`` ``cu_seqlens`` of equal shape).

GQA repeats key/value heads (``num_gqa_groups``); ``softmax_scale`` defaults to
``1/sqrt(d_k)``; dropout draws from ``get_rng_state_tracker().fork()``. It is a
``TransformerEngineBaseModule``, so its ``state_dict()`` has ``_extra_state`` too (an empty
uint8 tensor without FP8; base.py:848).
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from transformer_engine.pytorch.attention.context_parallel import thd_context_parallel
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule, check_unsupported

MASK_TYPES = ("no_mask", "causal", "causal_bottom_right", "padding", "padding_causal")


def _heads_first(x: torch.Tensor, qkv_format: str) -> torch.Tensor:
    """``sbhd``/``bshd`` -> ``[b, h, s, d]``."""
    return x.permute(1, 2, 0, 3) if qkv_format == "sbhd" else x.transpose(1, 2)


def _causal(sq: int, sk: int, bottom_right: bool, device) -> torch.Tensor:
    offset = sk - sq if bottom_right else 0
    rows = torch.arange(sq, device=device)[:, None] + offset
    return torch.arange(sk, device=device)[None, :] <= rows


class _UnfusedBackend(torch.nn.Module):
    """TE's ``UnfusedDotProductAttention`` as far as its scale goes (``backends.py``)."""

    def __init__(self, softmax_scale: float):
        super().__init__()
        self.softmax_scale = softmax_scale


class DotProductAttention(TransformerEngineBaseModule):
    """Core attention ``softmax(q k^T * scale) v`` for Megatron's ``TEDotProductAttention``."""

    def __init__(
        self,
        num_attention_heads: int,
        kv_channels,
        num_gqa_groups=None,
        attention_dropout: float = 0.0,
        qkv_format: str = "sbhd",
        attn_mask_type: str = "causal",
        window_size=None,
        bottom_right_diagonal=None,
        sequence_parallel: bool = False,
        tp_size: int = 1,
        get_rng_state_tracker=None,
        tp_group=None,
        layer_number=None,
        attention_type: str = "self",
        cp_group=None,
        cp_global_ranks=None,
        cp_stream=None,
        cp_comm_type: str = "p2p",
        softmax_scale=None,
        softmax_type: str = "vanilla",
        return_max_logit=False,
    ) -> None:
        super().__init__()
        check_unsupported(
            "DotProductAttention",
            window_size=window_size not in (None, (-1, -1), (-1, 0)) and window_size,
            cp_comm_type=_several_ranks(cp_global_ranks) and cp_comm_type != "p2p" and cp_comm_type,
            softmax_type=softmax_type != "vanilla" and softmax_type,
            return_max_logit=return_max_logit,
        )
        if attn_mask_type not in MASK_TYPES:
            raise NotImplementedError(f"attn_mask_type={attn_mask_type!r} in the stand-in")
        self.qkv_format, self.attn_mask_type = qkv_format, attn_mask_type
        self.attention_type, self.layer_number = attention_type, layer_number
        self.tp_size, self.tp_group = tp_size, tp_group
        self.sequence_parallel = sequence_parallel
        self.get_rng_state_tracker = get_rng_state_tracker
        self.cp_group, self.cp_global_ranks, self.cp_comm_type = (
            cp_group,
            cp_global_ranks,
            cp_comm_type,
        )
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        self.hidden_size_per_attention_head_k, self.hidden_size_per_attention_head_v = (
            kv_channels if isinstance(kv_channels, tuple) else (kv_channels, kv_channels)
        )
        self.num_gqa_groups_per_partition = self.num_gqa_groups // tp_size
        scale = (
            softmax_scale
            if softmax_scale is not None
            else 1.0 / math.sqrt(self.hidden_size_per_attention_head_k)
        )
        # v2.14 :471: TE hands the scale to its backends and keeps it nowhere else; the
        # unfused one (no parameters, so no state-dict entries) is where readers find it.
        self.unfused_attention = _UnfusedBackend(scale)
        self.attention_dropout = attention_dropout

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p"):
        """:536: context parallelism is computed for ``cp_comm_type="p2p"`` (THD only)."""
        check_unsupported(
            "set_context_parallel_group",
            cp_comm_type=_several_ranks(cp_global_ranks) and cp_comm_type != "p2p" and cp_comm_type,
        )
        self.cp_group, self.cp_global_ranks, self.cp_comm_type = (
            cp_group,
            cp_global_ranks,
            cp_comm_type,
        )

    def _dropout_context(self, p: float):
        if p > 0 and self.get_rng_state_tracker is not None:
            return self.get_rng_state_tracker().fork()
        return contextlib.nullcontext()

    def _sdpa(self, q, k, v, mask_type, padding_mask=None):
        """``[b, h, s, d]`` tensors -> ``[b, h, sq, d_v]``."""
        sq, sk = q.shape[2], k.shape[2]
        allowed = None
        if "causal" in mask_type:
            bottom_right = mask_type.endswith("bottom_right")
            allowed = _causal(sq, sk, bottom_right, q.device)
        if padding_mask is not None:
            keep = ~padding_mask  # TE: True = masked out
            allowed = keep if allowed is None else keep & allowed
        dropout = self.attention_dropout if self.training else 0.0
        with self._dropout_context(dropout):
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout,
                scale=self.unfused_attention.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )

    def _thd(self, q, k, v, mask_type, cu_q, cu_kv):
        """Per ``cu_seqlens`` segment: ``[t, h, d]`` -> ``[t, h * d_v]``."""
        assert all(x.dim() == 3 for x in (q, k, v)), (
            "Queries, keys and values must be 3D tensors when qkv_format = thd!"
        )
        assert "padding" in mask_type, (
            "Attention mask type must be padding or padding_causal for qkv_format=thd!"
        )
        assert cu_q is not None and cu_kv is not None
        assert cu_q.shape == cu_kv.shape and cu_q.dim() == 1
        assert cu_q.dtype == torch.int32 and cu_kv.dtype == torch.int32
        causal = mask_type.replace("padding", "no_mask" if mask_type == "padding" else "")
        bounds_q, bounds_kv = cu_q.tolist(), cu_kv.tolist()
        pieces = []
        for i in range(len(bounds_q) - 1):
            qi, ki, vi = (
                x[a:b].transpose(0, 1)[None]
                for x, (a, b) in (
                    (q, bounds_q[i : i + 2]), (k, bounds_kv[i : i + 2]), (v, bounds_kv[i : i + 2])
                )
            )  # fmt: skip
            pieces.append(self._sdpa(qi, ki, vi, causal or "no_mask")[0].transpose(0, 1))
        out = torch.cat(pieces) if pieces else q.new_empty(0, *q.shape[1:])
        return out.reshape(out.shape[0], -1)

    def _thd_context_parallel(self, q, k, v, mask_type, cu_q, cu_kv, cu_q_pad, cu_kv_pad):
        """This rank's share of a THD batch under context parallelism (context_parallel.py),
        with the THD asserts of the plain path."""
        assert all(x.dim() == 3 for x in (q, k, v)), (
            "Queries, keys and values must be 3D tensors when qkv_format = thd!"
        )
        assert "padding" in mask_type, (
            "Attention mask type must be padding or padding_causal for qkv_format=thd!"
        )
        assert cu_q.dtype == torch.int32 and cu_kv.dtype == torch.int32
        return thd_context_parallel(
            q,
            k,
            v,
            causal=mask_type == "padding_causal",
            cu_q=cu_q,
            cu_kv=cu_kv,
            cu_q_padded=cu_q if cu_q_pad is None else cu_q_pad,
            cu_kv_padded=cu_kv if cu_kv_pad is None else cu_kv_pad,
            group=self.cp_group,
            sdpa=lambda qi, ki, vi, allowed: self._sdpa(qi, ki, vi, "no_mask", ~allowed),
        )

    def forward(
        self,
        query_layer,
        key_layer,
        value_layer,
        attention_mask=None,
        qkv_format=None,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
        cu_seqlens_q_padded=None,
        cu_seqlens_kv_padded=None,
        max_seqlen_q=None,
        max_seqlen_kv=None,
        attn_mask_type=None,
        window_size=None,
        bottom_right_diagonal=None,
        checkpoint_core_attention=False,
        core_attention_bias_type="no_bias",
        core_attention_bias=None,
        alibi_slopes=None,
        fast_zero_fill=True,
        inference_params=None,
        pad_between_seqs=None,
        fp8_output=False,
        num_splits=1,
    ):
        check_unsupported(
            "DotProductAttention.forward",
            window_size=window_size not in (None, (-1, -1), (-1, 0)) and window_size,
            core_attention_bias_type=core_attention_bias_type != "no_bias"
            and core_attention_bias_type,
            alibi_slopes=alibi_slopes is not None,
            inference_params=inference_params is not None,
            pad_between_seqs=pad_between_seqs,
            fp8_output=fp8_output,
        )  # fmt: skip
        qkv_format = self.qkv_format if qkv_format is None else qkv_format
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in MASK_TYPES:
            raise NotImplementedError(f"attn_mask_type={mask_type!r} in the stand-in")
        if _several_ranks(self.cp_global_ranks):
            check_unsupported("DotProductAttention.forward (context parallel)",
                              qkv_format=qkv_format != "thd" and qkv_format)  # fmt: skip
            return self._thd_context_parallel(
                query_layer, key_layer, value_layer, mask_type,
                cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded, cu_seqlens_kv_padded,
            )  # fmt: skip
        check_unsupported(
            "DotProductAttention.forward",
            cu_seqlens_padded=not _same(cu_seqlens_q_padded, cu_seqlens_q)
            or not _same(cu_seqlens_kv_padded, cu_seqlens_kv),
        )
        if qkv_format == "thd":
            return self._thd(
                query_layer, key_layer, value_layer, mask_type, cu_seqlens_q, cu_seqlens_kv
            )
        assert qkv_format in ("sbhd", "bshd"), f"qkv_format={qkv_format!r} is not supported"
        assert all(x.dim() == 4 for x in (query_layer, key_layer, value_layer)), (
            f"Queries, keys and values must be 4D tensors when {qkv_format=}!"
        )
        q, k, v = (_heads_first(x, qkv_format) for x in (query_layer, key_layer, value_layer))
        padding = attention_mask if "padding" in mask_type else None
        if "padding" in mask_type and padding is None:
            raise AssertionError("padding mask types need attention_mask for sbhd/bshd")
        out = self._sdpa(q, k, v, mask_type, padding)  # [b, h, sq, d_v]
        out = out.permute(2, 0, 1, 3) if qkv_format == "sbhd" else out.transpose(1, 2)
        return out.reshape(*out.shape[:2], -1)


def _several_ranks(ranks) -> bool:
    return ranks is not None and len(ranks) > 1


def _same(padded, plain) -> bool:
    return padded is None or padded is plain or torch.equal(padded, plain)
