"""``transformer_engine.pytorch.router``: import-time placeholders.

Megatron-Core imports these three names unconditionally once TE >= 2.7 is detected
(``extensions/transformer_engine.py``: 0.16.1 ~2488, 0.19.2 ~3558) and calls them only
with ``moe_router_fusion=True`` (TE's CUDA router kernels). The stand-in has no such
kernels, so each one raises ``NotImplementedError`` when called.
"""


def _placeholder(name: str):
    def fused(*args, **kwargs):
        raise NotImplementedError(
            f"transformer_engine.pytorch.router.{name} is a CUDA kernel; the Transformer "
            f"Engine stand-in does not implement it (set moe_router_fusion=False)"
        )

    fused.__name__ = name
    return fused


fused_topk_with_score_function = _placeholder("fused_topk_with_score_function")
fused_compute_score_for_moe_aux_loss = _placeholder("fused_compute_score_for_moe_aux_loss")
fused_moe_aux_loss = _placeholder("fused_moe_aux_loss")
