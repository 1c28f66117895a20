"""Fusible-operation base classes, after TE v2.14 ``pytorch/ops/op.py``.

The contract that matters for checkpoints: every ``BasicOperation`` has
``get_extra_state``/``set_extra_state`` (op.py:528-640), so a norm's ``state_dict()`` has
``<prefix>_extra_state`` even though it holds no FP8 state:

- ``get_extra_state``: the quantizer state of the "forward"/"backward" modes; an **empty
  ``torch.uint8`` tensor** when there is none (op.py:591-592), else
  ``torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)``.
- ``set_extra_state``: ``None`` or an empty tensor is ignored (op.py:606-607); otherwise
  ``pickle.loads(state.detach().numpy(force=True).tobytes())``, and an empty dict is
  ignored. The stand-in keeps a non-empty quantizer state as read, so it round-trips.
"""

import abc
import pickle
from typing import Optional

import torch


class FusibleOperation(torch.nn.Module, metaclass=abc.ABCMeta):
    """op.py:57: a module that TE can fuse with its neighbours (never fused here)."""

    @property
    def is_fused_op(self) -> bool:
        return False


class BasicOperation(FusibleOperation, metaclass=abc.ABCMeta):
    """op.py:172: a single operation; holds the (absent) quantizer state."""

    def __init__(self) -> None:
        super().__init__()
        self._fp8_metas = None
        self._loaded_quantizer_state = {}

    def get_extra_state(self) -> torch.Tensor:
        state = dict(self._loaded_quantizer_state)
        if not state:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state: Optional[torch.Tensor]) -> None:
        if state is None or state.numel() == 0:
            return
        state = pickle.loads(state.detach().numpy(force=True).tobytes())
        if state is None or len(state) == 0:
            return
        self._loaded_quantizer_state = {m: state[m] for m in ("forward", "backward") if m in state}
