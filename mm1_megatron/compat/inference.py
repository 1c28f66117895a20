"""Generation through Megatron-Core's static KV cache, across releases.

megatron-core 0.16 treats a model as generating when it is given an ``inference_context``
in eval mode. 0.19 also reads a process-wide flag (``megatron.core.inference.utils.
InferenceMode``) that its inference engines set; without it the model asserts or skips
the cache. ``generation_mode()`` sets the flag where it exists, for the duration of one
generation, and restores it after (also on error); it also turns on the direct layer
paths of ``inference_layers.py``.

``RotatedKeyCacheSelfAttention``, the decoder's self-attention, changes how the static
cache is kept (rotated keys, a row-major layout) and, while generating, runs its forward
without Megatron-Core's branches for other cases; ``inference_rope.py`` has its RoPE.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from megatron.core.transformer.attention import (
    SelfAttention,
    _yarn_get_concentration_factor_from_config,
    apply_rotary_pos_emb,
)

from mm1_megatron.compat import inference_layers
from mm1_megatron.compat.inference_rope import ROPE_TABLES, rotate, unfused_rope
from mm1_megatron.compat.patching import CompatibilityError, register_patch

inference_layers.install()

try:  # megatron-core >= 0.19
    from megatron.core.inference.utils import InferenceMode
except ImportError:  # 0.16: inference follows from the context argument alone
    InferenceMode = None


@contextlib.contextmanager
def generation_mode():
    """Megatron-Core's inference flag where it has one, and the direct layer paths of
    ``inference_layers`` (restored on exit, also on error)."""
    with inference_layers.generating():
        if InferenceMode is None or not hasattr(InferenceMode, "active"):
            yield
        else:
            with InferenceMode.active():
                yield


# --- Keys rotated once, when they enter the static cache -----------------------------
#
# Megatron-Core's static KV cache stores keys *before* RoPE and re-rotates the whole
# cache, ``[:sequence_end]``, at every decode step; on CPU that re-rotation was most of a
# decode step. Rotating each key once, with its own position, before it is stored gives
# the same keys (same function, same inputs); afterwards the forward rotates the query
# only, as Megatron-Core's dynamic-batching cache already does (``k_pos_emb=None``).
#
# With the unfused RoPE (CPU) the query is rotated here too, and both from ``cos``/``sin``
# computed once per generation (``inference_rope.py``).

_ROTATED_KEYS_WRITTEN_FOR = "megatron-core 0.16.1-0.19.2"

register_patch(
    "megatron.core.transformer.attention.SelfAttention._adjust_key_value_for_inference (subclass)",
    reason="store RoPE-rotated keys in the static KV cache instead of re-rotating it per "
    "token; rotate new queries and keys from cos/sin computed once per generation",
    written_for=_ROTATED_KEYS_WRITTEN_FOR,
)
register_patch(
    "megatron.core.transformer.attention.SelfAttention._allocate_memory (subclass)",
    reason="the static KV cache laid out [batch, groups, seq, dim] in memory, as attention "
    "reads it (same [seq, batch, groups, dim] shape)",
    written_for=_ROTATED_KEYS_WRITTEN_FOR,
)


def _check_rotated_key_target() -> None:
    expected = {
        "_adjust_key_value_for_inference": [
            "self",
            "inference_context",
            "query",
            "key",
            "value",
            "rotary_pos_emb",
        ],
        "_allocate_memory": ["self", "inference_max_sequence_length", "batch_size", "dim", "dtype"],
    }
    for method, names in expected.items():
        parameters = list(inspect.signature(getattr(SelfAttention, method)).parameters)
        if parameters[: len(names)] != names:
            raise CompatibilityError(
                f"SelfAttention.{method} no longer takes {names[1:]} first (written for "
                f"{_ROTATED_KEYS_WRITTEN_FOR}); update mm1_megatron/compat/inference.py"
            )


_check_rotated_key_target()


def _plain_self_attention(attention) -> bool:
    """Self-attention whose forward, with the static cache, is only: query, key and value,
    the cache (here, with RoPE), core attention, output projection."""
    config = attention.config
    return (
        unfused_rope(config)
        and not config.flash_decode
        and not config.test_mode
        and not getattr(config, "attention_output_gate", False)
        and getattr(config, "cuda_graph_impl", "none") == "none"
        and not getattr(attention, "offload_qkv_linear", False)
        and not getattr(attention, "offload_attn_proj", False)
    )


class RotatedKeyCacheSelfAttention(SelfAttention):
    """``SelfAttention`` whose static KV cache holds keys with RoPE already applied.

    With the unfused RoPE both the new queries and keys are rotated here, from ``cos`` /
    ``sin`` tables computed once per generation (``inference_rope.py``); the forward then
    rotates nothing. Otherwise the key is rotated here with Megatron-Core's function and
    the forward rotates the query."""

    def forward(
        self,
        hidden_states,
        attention_mask,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        *args,
        **kwargs,
    ):
        """While generating with the static cache, Megatron-Core's forward without its
        branches for other cases (``_plain_self_attention``, no positional extras):
        the same modules in the same order. Otherwise Megatron-Core's forward."""
        direct = (
            inference_layers.generating_now()
            and not args
            and not any(value is not None for value in kwargs.values())
            and key_value_states is None
            and inference_context is not None
            and inference_context.is_static_batching()
            and not self.training
            and inference_layers.cached(self, "_mm1_direct_attention", _plain_self_attention)
        )
        if not direct:
            return super().forward(
                hidden_states,
                attention_mask,
                key_value_states,
                inference_context,
                rotary_pos_emb,
                *args,
                **kwargs,
            )
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        # Rotates the query and the key (the unfused RoPE is part of _plain_self_attention).
        query, key, value, _, mask_type, _ = self._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb
        )
        context = self.core_attention(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=mask_type,
            attention_bias=None,
            packed_seq_params=None,
        )
        return self.linear_proj(context)

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        """Megatron-Core's ``[s, b, groups, d]`` cache, laid out as ``[b, groups, s, d]``
        in memory: each row's and group's keys are then one block, the layout attention
        reads them in (decode steps permute to ``[b, groups, s, d]``), where Megatron-Core's
        layout made SDPA read them strided (1.4x its time at batch 8 on CPU)."""
        if self.config.flash_decode:  # its kernels take the cache as Megatron-Core lays it
            return super()._allocate_memory(inference_max_sequence_length, batch_size, dim, dtype)
        memory = torch.empty(
            batch_size,
            self.num_query_groups_per_partition,
            inference_max_sequence_length,
            dim,
            dtype=dtype,
            device=torch.cuda.current_device(),
        )
        return memory.permute(2, 0, 1, 3)

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        rotates_here = (
            inference_context is not None
            and inference_context.is_static_batching()
            and rotary_pos_emb is not None
            and not self.config.flash_decode
        )
        if not rotates_here:
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        if q_pos_emb is k_pos_emb and unfused_rope(self.config):
            rows = ROPE_TABLES.rows(k_pos_emb, mscale, key.dtype, start, end)
            query, key = rotate(query, *rows), rotate(key, *rows)
            rotary_pos_emb = None  # nothing left to rotate
        else:
            key = apply_rotary_pos_emb(
                key,
                k_pos_emb[start:end],
                config=self.config,
                mscale=mscale,
                cp_group=self.pg_collection.cp,
            )
        query, key, value, rotary_pos_emb, mask_type, block_table = (
            super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        )
        if rotary_pos_emb is not None:
            rotary_pos_emb = (rotary_pos_emb[0], None)
        return query, key, value, rotary_pos_emb, mask_type, block_table
