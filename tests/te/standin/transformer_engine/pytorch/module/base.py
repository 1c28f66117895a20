"""``TransformerEngineBaseModule`` without CUDA: parameter init and the extra-state contract.

Follows TE v2.14 ``transformer_engine/pytorch/module/base.py``:

- ``__init__`` (base.py:641-670) sets the same attributes Megatron-Core reads (``fp8``,
  ``fp8_meta``, ``tp_group``, ``tp_size``, ``sequence_parallel``, ``param_init_meta``) but
  does not raise "TransformerEngine needs CUDA" (base.py:643).
- ``register_parameter``/``reset_parameters`` (base.py:1270-1330): each parameter keeps its
  ``init_fn`` and is initialised under ``get_rng_state_tracker().fork(rng_tracker_name)``.
- ``get_extra_state`` (base.py:848-907): without FP8 state an **empty ``torch.uint8``
  tensor**; with it (``fp8_meta["fp8_checkpoint"]``, ``fp8`` or ``fp8_calibration``) a
  uint8 tensor holding ``pickle.dumps({"recipe", ["scale_fwd", ...], "extra_fp8_variables"})``.
  So ``state_dict()`` always has ``<prefix>_extra_state``.
- ``set_extra_state`` (base.py:909-960): ``None`` or an empty tensor is ignored; a tensor is
  read with ``pickle.loads(state.detach().cpu().numpy().tobytes())``; an ``io.BytesIO`` with
  ``torch.load``; anything else is ``RuntimeError("Unsupported checkpoint format.")``. A
  state without ``"recipe"`` (TE 1.x) gets ``DelayedScaling()``. The scaling tensors are
  kept as they were read (no FP8 meta tensors exist on CPU).
"""

import io
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from transformer_engine.common.recipe import DelayedScaling
from transformer_engine.pytorch.quantization import FP8GlobalStateManager


@dataclass
class _ParamInitMeta:
    init_fn: Optional[Callable] = None
    get_rng_state_tracker: Optional[Callable] = None
    fp8_meta_index: Optional[int] = None


def check_unsupported(owner: str, **options) -> None:
    """Refuse TE features the stand-in does not compute (userbuffers, fused wgrad, ...)."""
    for name, value in options.items():
        if value:
            raise NotImplementedError(
                f"{owner}({name}={value!r}) is not implemented by the Transformer Engine "
                f"stand-in (tests/te/standin)"
            )


class TransformerEngineBaseModule(torch.nn.Module):
    """Base of Linear, LayerNormLinear, GroupedLinear and DotProductAttention."""

    def __init__(self, name: Optional[str] = None) -> None:
        super().__init__()
        self.name = name
        self.fp8_initialized = False
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.fp8_meta_tensors_initialized = False
        self.quantizers = {"scaling_fwd": {}, "scaling_bwd": {}}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False
        self.param_init_meta = {}
        self.primary_weights_in_fp8 = FP8GlobalStateManager.with_fp8_parameters()
        self.preserve_high_precision_init_val = False
        self.fsdp_wrapped = False
        self.fsdp_group = None
        self.activation_dtype: Optional[torch.dtype] = None
        self.wgrad_accumulation_and_reduce_hooks = []
        self._fp8_scaling_state = {}

    def fast_setattr(self, name, value) -> None:
        self.__dict__[name] = value

    def module_setattr(self, name, value) -> None:
        super().__setattr__(name, value)

    def set_tensor_parallel_group(self, tp_group) -> None:
        """base.py:988: the group TE communicates over (None: no communication)."""
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def register_parameter(self, name, param, **kwargs):
        """base.py:1270: remember how to (re)initialise the parameter."""
        super().register_parameter(name, param)
        self.param_init_meta[name] = _ParamInitMeta(**kwargs)

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        """base.py:1283: run each ``init_fn`` under the RNG tracker's fork."""
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            meta = self.param_init_meta[name]
            if meta.init_fn is None:
                continue
            tracker = meta.get_rng_state_tracker
            rng_name = getattr(self, "rng_tracker_name", None)
            with torch.no_grad():
                if tracker is None:
                    meta.init_fn(param)
                elif rng_name:
                    with tracker().fork(rng_name):
                        meta.init_fn(param)
                else:
                    with tracker().fork():
                        meta.init_fn(param)

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        """base.py:1013-1070 without FP8: copy the global FP8 flags, set
        ``fp8_meta["fp8_checkpoint"] = False`` and return (Megatron-Core's
        ``TEGroupedLinear.merge_extra_states`` load hook calls it first)."""
        self.fp8_parameters = FP8GlobalStateManager.with_fp8_parameters()
        self.fp8 = FP8GlobalStateManager.is_fp8_enabled()
        self.fp8_calibration = FP8GlobalStateManager.is_fp8_calibration()
        fp8_enabled = self.fp8 or self.fp8_calibration
        self.fp8_meta["fp8_checkpoint"] = fp8_enabled
        check_unsupported("init_fp8_metadata", fp8=fp8_enabled or self.fp8_parameters)
        self.fp8_initialized = False

    def get_extra_state(self) -> torch.Tensor:
        """base.py:848-907 (see the module docstring)."""
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8 or self.fp8_calibration):
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": self.fp8_meta["recipe"], **self._fp8_scaling_state}
        state["extra_fp8_variables"] = {
            k: v
            for k, v in self.fp8_meta.items()
            if k != "buffer_index_and_autocast_key"
            and isinstance(v, (bool, int, float, str, tuple, list))
        }
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """base.py:909-960 (see the module docstring)."""
        if state is None:
            return
        if isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            state = pickle.loads(state.detach().cpu().numpy().tobytes())
        elif isinstance(state, io.BytesIO):
            state.seek(0)
            state = torch.load(state, map_location="cpu")
        else:
            raise RuntimeError("Unsupported checkpoint format.")
        if state is None:
            return
        if "recipe" not in state:
            state["recipe"] = DelayedScaling()
            state.pop("scale_inv_fwd", None)
            state.pop("scale_inv_bwd", None)
        self.fp8_meta.update(state["extra_fp8_variables"])
        self.fp8_meta["recipe"] = state["recipe"]
        self._fp8_scaling_state = {
            k: v for k, v in state.items() if k not in ("recipe", "extra_fp8_variables")
        }

    def backward_dw(self):
        """base.py:1564: only with ``delay_wgrad_compute``, which the stand-in refuses."""
        raise NotImplementedError("delay_wgrad_compute is not implemented by the stand-in")
