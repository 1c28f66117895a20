"""``transformer_engine.pytorch.ops``: only the norm operations behind ``te.pytorch.RMSNorm``
and ``te.pytorch.LayerNorm``. Fusible ops Megatron-Core reaches only with
``use_te_activation_func`` / ``TEFusedMLP`` (``SwiGLU``, ``BasicLinear``, ``Sequential``...)
are absent on purpose, so asking for one raises ``AttributeError`` naming it.

Import-time placeholder: ``Sequential`` (and ``FusibleOperation``) appear in return
annotations of Megatron-Core's ``TEFusedMLP`` (0.16.1 ~1916/2044, 0.19.2 ~646/2732/2860/3067),
evaluated when the class is defined; ``Sequential()`` itself raises."""

from transformer_engine.pytorch.ops.norms import LayerNorm, RMSNorm  # noqa: F401
from transformer_engine.pytorch.ops.op import BasicOperation, FusibleOperation  # noqa: F401


class Sequential(FusibleOperation):
    """Placeholder for TE's fused op pipeline (``ops/sequential.py``): not constructible."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "transformer_engine.pytorch.ops.Sequential (TEFusedMLP, use_te_activation_func) "
            "is not implemented by the Transformer Engine stand-in"
        )
