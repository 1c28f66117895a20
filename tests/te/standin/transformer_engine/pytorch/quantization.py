"""FP8 global state and autocast, after TE v2.14 ``pytorch/quantization.py``.

The stand-in never quantizes: ``FP8GlobalStateManager`` reports FP8 as unavailable and
disabled (quantization.py:235-470 is the real state machine), and entering
``fp8_autocast``/``autocast`` with ``enabled=True`` raises, naming the reason. With
``enabled=False`` both are no-ops, which is how Megatron-Core enters them on every
forward of a bf16/fp32 run (``fp8_utils.get_fp8_context``).
"""

from contextlib import contextmanager

from transformer_engine.common.recipe import DelayedScaling, Recipe

_NO_FP8 = "the Transformer Engine stand-in (tests/te/standin) has no FP8 kernels"


class FP8GlobalStateManager:
    """Class-level FP8 state (quantization.py:235). Always "FP8 off" here."""

    FP8_ENABLED = False
    FP8_CALIBRATION = False
    FP8_RECIPE = None
    FP8_DISTRIBUTED_GROUP = None
    FP8_PARAMETERS = False
    HIGH_PRECISION_INIT_VAL = False
    IS_FIRST_FP8_MODULE = False
    FP8_GRAPH_CAPTURING = False

    @classmethod
    def reset(cls) -> None:
        cls.FP8_ENABLED = cls.FP8_CALIBRATION = cls.FP8_PARAMETERS = False
        cls.FP8_RECIPE = cls.FP8_DISTRIBUTED_GROUP = None

    @classmethod
    def is_fp8_available(cls):
        return False, _NO_FP8

    is_mxfp8_available = is_fp8_available
    is_fp8_block_scaling_available = is_fp8_available
    is_nvfp4_available = is_fp8_available

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def is_fp8_calibration(cls) -> bool:
        return cls.FP8_CALIBRATION

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return cls.FP8_PARAMETERS

    @classmethod
    def with_high_precision_init_val(cls) -> bool:
        return cls.HIGH_PRECISION_INIT_VAL

    @classmethod
    def fp8_graph_capturing(cls) -> bool:
        return cls.FP8_GRAPH_CAPTURING

    @classmethod
    def is_first_fp8_module(cls) -> bool:
        return cls.IS_FIRST_FP8_MODULE

    @classmethod
    def get_fp8_recipe(cls) -> Recipe:
        return cls.FP8_RECIPE if cls.FP8_RECIPE is not None else DelayedScaling()

    @classmethod
    def get_fp8_group(cls):
        return cls.FP8_DISTRIBUTED_GROUP


def is_fp8_available(return_reason: bool = False):
    """quantization.py:162: ``(False, reason)`` with ``return_reason``."""
    return (False, _NO_FP8) if return_reason else False


is_mxfp8_available = is_fp8_available
is_fp8_block_scaling_available = is_fp8_available
is_nvfp4_available = is_fp8_available


def _refuse(enabled: bool) -> None:
    if enabled:
        raise NotImplementedError(f"FP8 autocast with enabled=True: {_NO_FP8}")


@contextmanager
def autocast(
    enabled: bool = True,
    calibrating: bool = False,
    recipe=None,
    amax_reduction_group=None,
    _graph: bool = False,
):
    """quantization.py:801 (TE >= 2.8 name); a no-op unless ``enabled``."""
    _refuse(enabled or calibrating)
    yield


@contextmanager
def fp8_autocast(
    enabled: bool = True,
    calibrating: bool = False,
    fp8_recipe=None,
    fp8_group=None,
    _graph: bool = False,
):
    """quantization.py:767 (deprecated alias of ``autocast``); a no-op unless ``enabled``."""
    _refuse(enabled or calibrating)
    yield


@contextmanager
def fp8_model_init(enabled: bool = True, recipe=None, preserve_high_precision_init_val=False):
    """quantization.py:673; FP8 parameters are refused."""
    _refuse(enabled)
    yield


quantized_model_init = fp8_model_init
