"""``transformer_engine.pytorch.tensor``: ``QuantizedTensor`` only.

Megatron-Core's ``fp8_utils.py`` imports it at module level with TE >= 2.0 (both lines,
line 46) as the class every FP8 tensor derives from (TE v2.14
``pytorch/quantized_tensor.py``) and uses it in ``isinstance`` checks. The stand-in has no
FP8 tensors, so the class cannot be instantiated and no tensor is ever an instance: every
``is_float8tensor`` is False, as in a bf16 run. ``mxfp8_tensor``, ``nvfp4_tensor``,
``grouped_tensor`` and ``utils`` are absent (Megatron-Core imports them in try blocks).
"""

import torch


class QuantizedTensor(torch.Tensor):
    """Import-time placeholder for TE's quantized tensor base class."""

    def __new__(cls, *args, **kwargs):
        raise NotImplementedError("the Transformer Engine stand-in has no quantized tensors")
