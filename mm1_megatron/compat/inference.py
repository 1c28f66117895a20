"""Generation through Megatron-Core's static KV cache, across releases.

megatron-core 0.16 treats a model as generating when it is given an ``inference_context``
in eval mode. 0.19 also reads a process-wide flag (``megatron.core.inference.utils.
InferenceMode``) that its inference engines set; without it the model asserts or skips
the cache. ``generation_mode()`` sets the flag where it exists, for the duration of one
generation, and restores it after (also on error).
"""

from __future__ import annotations

import contextlib
import inspect

from megatron.core.transformer.attention import (
    SelfAttention,
    _yarn_get_concentration_factor_from_config,
    apply_rotary_pos_emb,
)

from mm1_megatron.compat.patching import CompatibilityError, register_patch

try:  # megatron-core >= 0.19
    from megatron.core.inference.utils import InferenceMode
except ImportError:  # 0.16: inference follows from the context argument alone
    InferenceMode = None


@contextlib.contextmanager
def generation_mode():
    if InferenceMode is None or not hasattr(InferenceMode, "active"):
        yield
        return
    with InferenceMode.active():
        yield


# --- Keys rotated once, when they enter the static cache -----------------------------
#
# Megatron-Core's static KV cache stores keys *before* RoPE and re-rotates the whole
# cache, ``[:sequence_end]``, at every decode step; on CPU that re-rotation was most of a
# decode step. Rotating each key once, with its own position, before it is stored gives
# the same keys (same function, same inputs); afterwards the forward rotates the query
# only, as Megatron-Core's dynamic-batching cache already does (``k_pos_emb=None``).

_ROTATED_KEYS_WRITTEN_FOR = "megatron-core 0.16.1-0.19.2"

register_patch(
    "megatron.core.transformer.attention.SelfAttention._adjust_key_value_for_inference (subclass)",
    reason="store RoPE-rotated keys in the static KV cache instead of re-rotating it per token",
    written_for=_ROTATED_KEYS_WRITTEN_FOR,
)


def _check_rotated_key_target() -> None:
    parameters = inspect.signature(SelfAttention._adjust_key_value_for_inference).parameters
    expected = ["self", "inference_context", "query", "key", "value", "rotary_pos_emb"]
    if list(parameters)[: len(expected)] != expected:
        raise CompatibilityError(
            "SelfAttention._adjust_key_value_for_inference no longer takes "
            f"{expected[1:]} first (written for {_ROTATED_KEYS_WRITTEN_FOR}); "
            "update mm1_megatron/compat/inference.py"
        )


_check_rotated_key_target()


class RotatedKeyCacheSelfAttention(SelfAttention):
    """``SelfAttention`` whose static KV cache holds keys with RoPE already applied."""

    def _adjust_key_value_for_inference(
        self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
    ):
        rotates_here = (
            inference_context is not None
            and inference_context.is_static_batching()
            and rotary_pos_emb is not None
            and not self.config.flash_decode
        )
        if rotates_here:
            start = inference_context.sequence_len_offset
            _, k_pos_emb = rotary_pos_emb
            key = apply_rotary_pos_emb(
                key,
                k_pos_emb[start : start + key.size(0)],
                config=self.config,
                mscale=_yarn_get_concentration_factor_from_config(self.config),
                cp_group=self.pg_collection.cp,
            )
        query, key, value, rotary_pos_emb, mask_type, block_table = (
            super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
            )
        )
        if rotates_here:
            rotary_pos_emb = (rotary_pos_emb[0], None)
        return query, key, value, rotary_pos_emb, mask_type, block_table
