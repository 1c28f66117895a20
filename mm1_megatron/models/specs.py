"""Megatron-Core layer specs for the image encoder and the language model.

The implementation (local torch modules or Transformer Engine) is chosen by picking a
spec, never by editing the model. The ViT spec differs from Megatron-Core's GPT spec in
two ways: LayerNorm with biases, and a bidirectional (``no_mask``) self-attention.
Megatron-Core 0.16's own local ViT spec is causal, which is wrong for a ViT.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from mm1_megatron.compat import specs as compat_specs
from mm1_megatron.compat.inference import RotatedKeyCacheSelfAttention
from mm1_megatron.models.attention import (
    DenseMaskAttention,
    DocumentAttention,
    ImageDocumentAttention,
    te_document_attention_class,
)
from mm1_megatron.models.norms import TorchNorm
from mm1_megatron.models.seeding import (
    seeded_experts_class,
    seeded_grouped_experts_class,
    seeded_layer_class,
)


def backend_provider(transformer_impl: str) -> BackendSpecProvider:
    """Spec provider for ``model.transformer_impl`` ('local' or 'transformer_engine')."""
    if transformer_impl == "transformer_engine":
        try:
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        except ImportError as exc:  # pragma: no cover - needs TE
            raise ValueError(
                "model.transformer_impl=transformer_engine but Transformer Engine cannot be "
                f"imported ({exc}); install it (`pip install -e .[te]`) or set "
                "model.transformer_impl=local"
            ) from exc
        return TESpecProvider()
    return LocalSpecProvider()


def vision_layer_spec(transformer_impl: str, *, per_image_attention: bool = False) -> ModuleSpec:
    """Pre-norm ViT layer: LayerNorm, bidirectional attention, non-gated MLP.

    ``per_image_attention`` (the native-resolution ViT): the core attention takes each
    packed patch's image index as its attention mask and keeps every image to itself
    (``models/attention.py``); without ids it is plain bidirectional attention."""
    backend = backend_provider(transformer_impl)
    core_attention = backend.core_attention()
    if per_image_attention:
        te = transformer_impl == "transformer_engine"
        core_attention = te_document_attention_class() if te else ImageDocumentAttention
    fused = backend.fuse_layernorm_and_linear()
    layer_norm = backend.layer_norm(rms_norm=False, for_qk=False)
    qkv = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=None)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else layer_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused else layer_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as Transformer Engine's fused norm+linear names them, so a
            # checkpoint saved with either implementation loads into the other (as
            # Megatron-Core's local GPT spec does for the decoder).
            sharded_state_dict_keys_map={}
            if fused
            else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def _is_moe(layer: ModuleSpec) -> bool:
    return getattr(compat_specs.spec_submodules(layer.submodules.mlp), "experts", None) is not None


def _with_te_key_layout(layer: ModuleSpec) -> ModuleSpec:
    """A local MoE layer's pre-MLP norm saved as ``pre_mlp_layernorm.*``, the key the TE
    spec gives it. Megatron-core's local spec maps it to ``mlp.linear_fc1.layer_norm_*``
    on every layer (0.16.1 ``gpt_layer_specs.py:417-420``, 0.19.2 ``:459-461``), which is
    TE's name only where TE fuses the norm into ``linear_fc1``: dense layers. Checkpoints
    written with the old name are read by ``checkpoint/key_layout.py``."""
    keys_map = dict(layer.submodules.sharded_state_dict_keys_map or {})
    if not _is_moe(layer) or keys_map.pop("pre_mlp_layernorm.", None) is None:
        return layer
    return compat_specs.with_submodules(
        layer,
        compat_specs.replace_fields(layer.submodules, sharded_state_dict_keys_map=keys_map),
    )


def _with_torch_norms(layer: ModuleSpec) -> ModuleSpec:
    """Swap Megatron's torch-norm wrapper (which rejects SP) for ``TorchNorm``, and any
    q/k norm (Qwen3; the local provider picks it from a module-level global) too.
    Megatron-Core's ``finalize_model_grads`` sums the q/k norms' gradients over the TP
    group by name: each rank normalises other heads with the same weight."""
    fields = {
        name: TorchNorm
        for name in ("input_layernorm", "pre_mlp_layernorm")
        if getattr(layer.submodules, name) is WrappedTorchNorm
    }
    attention = layer.submodules.self_attention
    attention_submodules = compat_specs.spec_submodules(attention)
    attention_fields = {
        name: TorchNorm
        for name in ("q_layernorm", "k_layernorm")
        if getattr(attention_submodules, name) is not IdentityOp
    }
    if attention_fields:
        fields["self_attention"] = compat_specs.with_submodules(
            attention, compat_specs.replace_fields(attention_submodules, **attention_fields)
        )
    return compat_specs.with_submodules(
        layer, compat_specs.replace_fields(layer.submodules, **fields)
    )


def core_attention_class(transformer_impl: str, attention: str):
    """The decoder's core attention: per packed document, or the dense-mask reference."""
    if attention == "dense_mask_reference":
        if transformer_impl != "local":
            raise ValueError(
                "model.attention=dense_mask_reference runs on the local implementation only; "
                "set model.transformer_impl=local"
            )
        return DenseMaskAttention
    if transformer_impl == "transformer_engine":
        return te_document_attention_class()
    return DocumentAttention


def _with_core_attention(layer: ModuleSpec, core_attention) -> ModuleSpec:
    """The decoder's self-attention: our core attention, and RoPE-rotated cached keys."""
    self_attention = layer.submodules.self_attention
    if compat_specs.spec_module(self_attention) is not SelfAttention:
        raise ValueError(
            "the decoder spec's self-attention is "
            f"{compat_specs.spec_module(self_attention).__name__}, not SelfAttention"
        )
    submodules = compat_specs.replace_fields(
        compat_specs.spec_submodules(self_attention), core_attention=core_attention
    )
    self_attention = compat_specs.with_submodules(self_attention, submodules)
    self_attention = compat_specs.with_module(self_attention, RotatedKeyCacheSelfAttention)
    return compat_specs.with_submodules(
        layer, compat_specs.replace_fields(layer.submodules, self_attention=self_attention)
    )


def _seeded(layer: ModuleSpec, init_seed: int) -> ModuleSpec:
    """Layer and experts drawn from streams keyed by their global index."""
    layer = compat_specs.with_module(
        layer, seeded_layer_class(init_seed, base=compat_specs.spec_module(layer))
    )

    def seed_experts(experts):
        module = compat_specs.spec_module(experts)
        if module is SequentialMLP:
            return compat_specs.with_module(experts, seeded_experts_class())
        if module is TEGroupedMLP:
            return compat_specs.with_module(experts, seeded_grouped_experts_class())
        raise ValueError(
            f"no layout-independent initialisation for MoE experts of type {module.__name__}"
        )

    mlp = compat_specs.map_experts(layer.submodules.mlp, seed_experts)
    return compat_specs.with_submodules(
        layer, compat_specs.replace_fields(layer.submodules, mlp=mlp)
    )


def language_block_spec(
    config: TransformerConfig,
    transformer_impl: str,
    *,
    attention: str = "per_document",
    vp_stage=None,
    init_seed: Optional[int] = None,
):
    """Llama-style decoder block (RMSNorm, SwiGLU, RoPE), dense or MoE per ``moe_layer_freq``.

    Only the layers of the current pipeline stage are built. The core attention takes the
    packed documents' ids (``models/attention.py``) and stays causal inside each one, with
    TE's varlen kernels under Transformer Engine and ``scaled_dot_product_attention`` per
    document otherwise; ``attention="dense_mask_reference"`` is the explicit-mask reference.
    """
    core_attention = core_attention_class(transformer_impl, attention)
    use_te = transformer_impl == "transformer_engine"
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )

    def transform(layer: ModuleSpec) -> ModuleSpec:
        if init_seed is not None:
            layer = _seeded(layer, init_seed)
        layer = _with_core_attention(layer, core_attention)
        return layer if use_te else _with_te_key_layout(_with_torch_norms(layer))

    final_norm = block.layer_norm
    if not use_te and final_norm is WrappedTorchNorm:
        final_norm = TorchNorm
    return compat_specs.map_layers(block, transform, layer_norm=final_norm)
