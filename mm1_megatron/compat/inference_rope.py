"""RoPE for the static KV cache's queries and keys, as Megatron-Core computes it, cheaper.

Megatron-Core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``, the CPU path)
computes ``cos`` and ``sin`` of its frequency table again for the query and for the key of
every layer at every decode step: about a quarter of the torch calls of a CPU decode
step. ``ROPE_TABLES`` computes them once per table and slices the current positions once
per step; ``rotate`` is that function's arithmetic on them, so the same bits, which
``_check_rotation_matches`` verifies at import (a full and a partial rotary width).
"""

from __future__ import annotations

import torch

from mm1_megatron.compat.patching import CompatibilityError

try:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
except ImportError as error:
    raise CompatibilityError(
        "megatron-core has no rope_utils._apply_rotary_pos_emb_bshd (compat/inference_rope.py "
        "was written for megatron-core 0.16.1-0.19.2)"
    ) from error

WRITTEN_FOR = "megatron-core 0.16.1-0.19.2"


class _RopeTables:
    """``cos`` and ``sin`` of one rotary table as Megatron-Core's unfused RoPE computes
    them (``(cos(freqs) * mscale).to(dtype)``), once per table instead of in every layer
    at every step, and their rows for the positions of the current step, once per step.

    ``sin`` is kept with its first half negated, so that ``roll(t) * sin`` is Megatron's
    ``cat((-x2, x1)) * sin`` (``x * -s == -x * s`` in floating point) in two operations
    instead of four. ``RotaryEmbedding.forward`` is ``lru_cache``d: every layer and step
    of one generation hands in the same table object, which the entry holds, so the
    identity test cannot match a new table at a reused address."""

    def __init__(self):
        self._table = self._rows = (None,)

    def rows(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype, start: int, end: int):
        """``(cos, signed sin, rotated width)`` of positions ``start .. end - 1``."""
        table = self._table
        if table[0] is not freqs or table[1] != mscale or table[2] != dtype:
            cos = (torch.cos(freqs) * mscale).to(dtype)
            sin = (torch.sin(freqs) * mscale).to(dtype)
            half = sin.shape[-1] // 2
            signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            self._table = table = (freqs, mscale, dtype, cos, signed, 2 * half)
            self._rows = (None,)
        if self._rows[0] is not table or self._rows[1:3] != (start, end):
            rows = (table[3][start:end], table[4][start:end], table[5])
            self._rows = (table, start, end, rows)
        return self._rows[3]


ROPE_TABLES = _RopeTables()


def rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, width: int):
    """Megatron-Core's unfused, non-interleaved ``_apply_rotary_pos_emb_bshd`` from the
    tables above: the same products and sums, so the same bits (checked at import)."""
    if width == t.shape[-1]:
        return (t * cos) + (torch.roll(t, width // 2, dims=-1) * signed_sin)
    rotated, rest = t[..., :width], t[..., width:]
    rotated = (rotated * cos) + (torch.roll(rotated, width // 2, dims=-1) * signed_sin)
    return torch.cat((rotated, rest), dim=-1)


def unfused_rope(config) -> bool:
    """The RoPE variant ``rotate`` reproduces (CPU, and GPUs without TE's fused RoPE)."""
    return not (
        config.apply_rope_fusion
        or config.rotary_interleaved
        or getattr(config, "multi_latent_attention", False)
    )


def _check_rotation_matches() -> None:
    """``rotate`` gives Megatron-Core's unfused RoPE bit for bit (full and partial)."""
    # CPU and fp32 whatever the defaults: this module may first be imported while a model
    # is built on the meta device (the exporter's skeleton).
    generator = torch.Generator().manual_seed(0)
    cpu = dict(generator=generator, dtype=torch.float32, device="cpu")
    t = torch.randn(5, 2, 3, 8, **cpu)
    for rot_dim in (8, 4):
        freqs = torch.randn(5, 1, 1, rot_dim, **cpu) * 10
        theirs = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, mscale=0.7)
        ours = rotate(t, *_RopeTables().rows(freqs, 0.7, t.dtype, 0, 5))
        if not torch.equal(ours, theirs):
            raise CompatibilityError(
                "megatron-core's _apply_rotary_pos_emb_bshd no longer computes what "
                f"compat/inference_rope.py's rotate does (written for {WRITTEN_FOR}); "
                "update mm1_megatron/compat/inference_rope.py"
            )


_check_rotation_matches()
