"""``dist_checkpointing.save`` with the same behaviour on every supported release.

megatron-core 0.19 added ``async_strategy`` to ``dist_checkpointing.save`` and defaults
it to ``"nvrx"``, the writer of the optional ``nvidia-resiliency-ext`` package; without
that package an asynchronous save raises ``ModuleNotFoundError``. megatron-core's own
writer (``"mcore"``) is what 0.16 always uses, so it is chosen explicitly where the
argument exists (feature detection on the signature).
"""

from __future__ import annotations

import inspect

from megatron.core import dist_checkpointing

_SAVE_TAKES_ASYNC_STRATEGY = (
    "async_strategy" in inspect.signature(dist_checkpointing.save).parameters
)


def save_sharded(sharded_state_dict, checkpoint_dir: str, *, async_save: bool):
    """``dist_checkpointing.save``; returns the async request when ``async_save``."""
    kwargs = {"async_sharded_save": async_save}
    if async_save and _SAVE_TAKES_ASYNC_STRATEGY:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, checkpoint_dir, **kwargs)
