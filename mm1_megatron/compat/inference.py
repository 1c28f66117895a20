"""Generation through Megatron-Core's static KV cache, across releases.

megatron-core 0.16 treats a model as generating when it is given an ``inference_context``
in eval mode. 0.19 also reads a process-wide flag (``megatron.core.inference.utils.
InferenceMode``) that its inference engines set; without it the model asserts or skips
the cache. ``generation_mode()`` sets the flag where it exists, for the duration of one
generation, and restores it after (also on error).
"""

from __future__ import annotations

import contextlib

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
