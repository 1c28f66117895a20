"""``transformer_engine.pytorch.distributed``: only what Megatron-Core names at import time.

``CudaRNGStatesTracker`` (TE v2.14 ``pytorch/distributed.py``) is subclassed by
Megatron-Core's ``TECudaRNGStatesTracker`` at module level, so the class must exist; it is
used only with ``config.use_te_rng_tracker``, which needs CUDA generators, so its methods
raise. ``checkpoint`` (TE's activation recompute) and ``is_fp8_activation_recompute_enabled``
are absent on purpose: Megatron-Core imports them lazily / inside try blocks and falls back.

``activation_recompute_forward`` is imported at module level by Megatron-Core's
``tensor_parallel/random.py`` (both lines) and entered only for FP8 recompute; it keeps
TE's two flags (distributed.py:65-66, 240-285).
"""

from contextlib import contextmanager

_FP8_ACTIVATION_RECOMPUTE_ENABLED = False
_FP8_ACTIVATION_RECOMPUTE_PHASE = False


@contextmanager
def activation_recompute_forward(activation_recompute: bool = False, recompute_phase: bool = False):
    """distributed.py:240-277: mark the forward as (re)computed for FP8 activation recompute."""
    global _FP8_ACTIVATION_RECOMPUTE_ENABLED, _FP8_ACTIVATION_RECOMPUTE_PHASE
    _FP8_ACTIVATION_RECOMPUTE_ENABLED = activation_recompute
    _FP8_ACTIVATION_RECOMPUTE_PHASE = recompute_phase
    try:
        yield
    finally:
        _FP8_ACTIVATION_RECOMPUTE_ENABLED = _FP8_ACTIVATION_RECOMPUTE_PHASE = False


def is_fp8_activation_recompute_enabled() -> bool:
    return _FP8_ACTIVATION_RECOMPUTE_ENABLED


def in_fp8_activation_recompute_phase() -> bool:
    return _FP8_ACTIVATION_RECOMPUTE_PHASE


_NO_CUDA = "the Transformer Engine stand-in has no CUDA RNG tracker (use_te_rng_tracker=False)"


class CudaRNGStatesTracker:
    """Placeholder base class (import-time only); every method fails loudly."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def reset(self):
        self.states_, self.seeds_ = {}, set()

    def get_states(self):
        raise NotImplementedError(_NO_CUDA)

    def set_states(self, states):
        raise NotImplementedError(_NO_CUDA)

    def add(self, name, seed):
        raise NotImplementedError(_NO_CUDA)

    def fork(self, name="model-parallel-rng"):
        raise NotImplementedError(_NO_CUDA)
