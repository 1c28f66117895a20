"""Initialisation that does not depend on the parallel layout.

Megatron-Core's CPU initialisation draws each weight in full and keeps this rank's
slice, so tensor parallelism already yields the single-process weights. Pipeline
parallelism does not: a stage that builds only decoder layers 3-4 would draw them from
a generator that never advanced through layers 1-2. Reseeding the CPU generator from
(seed, component) before each component and from (seed, global layer number) before
each decoder layer makes every parameter a function of the seed and its own identity,
so any TP/PP split starts from the weights of a single-process run.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from mm1_megatron.compat.experts import (
    grouped_mlp_with_expert_init,
    initialize_affine_weight_cpu,
    sequential_mlp_with_expert_hook,
)


def component_seed(seed: int, *keys) -> int:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: Optional[int], *keys):
    """Reseed the default CPU generator for a component; a no-op when ``seed`` is None."""
    if seed is not None:
        torch.default_generator.manual_seed(component_seed(seed, *keys))
    yield


def seeded_layer_class(seed: int, base=TransformerLayer):
    """A ``TransformerLayer`` subclass that reseeds from its global layer number first."""

    class SeededTransformerLayer(base):
        def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
            vp_stage = kwargs.get("vp_stage")
            offset = get_transformer_layer_offset(
                config, vp_stage, parallel_state.get_pipeline_model_parallel_rank()
            )
            torch.default_generator.manual_seed(
                component_seed(seed, "decoder_layer", layer_number + offset)
            )
            super().__init__(config, submodules, layer_number, *args, **kwargs)

    return SeededTransformerLayer


def _draw_key() -> int:
    return int(torch.randint(2**62, (1,), device="cpu").item())


def _draw_layer_key() -> int:
    # The layer's generator is in the same state on every EP rank here (the layer was
    # reseeded and the router drawn identically), so one draw keys the layer.
    return _draw_key()


def _reseed_for_expert(layer_key: int, which) -> None:
    torch.default_generator.manual_seed(component_seed(layer_key, "expert", which))


def _ends_on_a_keyed_stream(experts_class: type) -> type:
    """``experts_class`` leaving the generator in a state that depends on the layer only.

    Each rank draws only its own experts, each from its own stream, so after them the
    generator's state depends on which experts the rank holds; whatever is drawn next (the
    output layer, after a last decoder layer of experts) would then differ between expert
    layouts. The generator is the same on every rank on entry (``_draw_layer_key``), so
    the layer key drawn from it again keys the state to leave."""

    class EndsOnKeyedStream(experts_class):
        def __init__(self, *args, **kwargs):
            entry = torch.default_generator.get_state()
            super().__init__(*args, **kwargs)
            torch.default_generator.set_state(entry)
            _reseed_for_expert(_draw_key(), "after_experts")  # the layer key, drawn again

    EndsOnKeyedStream.__name__ = experts_class.__name__
    EndsOnKeyedStream.__qualname__ = experts_class.__qualname__
    return EndsOnKeyedStream


def seeded_experts_class() -> type:
    """Megatron's ``SequentialMLP`` with each expert drawn from a stream keyed by its global
    index, so expert parallelism (which builds only this rank's experts) starts from the
    same experts as a single-process run."""

    def make_hook():
        layer_key = _draw_layer_key()
        return lambda global_index: _reseed_for_expert(layer_key, global_index)

    return _ends_on_a_keyed_stream(sequential_mlp_with_expert_hook(make_hook))


def draw_expert_weights(
    config, layer_key: int, global_index: int, fc1: torch.Tensor, fc2: torch.Tensor
) -> None:
    """Fill one expert's ``fc1`` and ``fc2`` (this expert-TP rank's slices) with the values a
    seeded ``SequentialMLP`` expert gets: Megatron's CPU initialisation of ``linear_fc1``
    (column-parallel, ``init_method``) and then ``linear_fc2`` (row-parallel,
    ``output_layer_init_method``) from the expert's own stream."""
    rank = parallel_state.get_expert_tensor_parallel_rank()
    world = parallel_state.get_expert_tensor_parallel_world_size()
    ffn = config.moe_ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    # Megatron-Core's MLP builds a gated linear_fc1 with stride 2 (stride 1 under Kitchen),
    # so each rank holds its [gate, up] chunks interleaved, not a contiguous row block
    # (transformer/mlp.py:105-133 in 0.16.1, :206-233 in 0.19.2; the split is
    # weight_list[rank::world_size] of stride-sized chunks, tensor_parallel/layers.py
    # :179-184 in 0.16.1, :214-219 in 0.19.2). At expert-TP 1 both splits are the whole
    # weight (tests/parallel/test_grouped_expert_init_tp2.py checks TP 2).
    fc1_stride = 2 if config.gated_linear_unit and not config.use_kitchen else 1
    _reseed_for_expert(layer_key, global_index)
    fc1_shape = (ffn, config.hidden_size)
    fc2_shape = (config.hidden_size, config.moe_ffn_hidden_size)
    for weight, full_shape, dim, init, stride in (
        (fc1, fc1_shape, 0, config.init_method, fc1_stride),
        (fc2, fc2_shape, 1, config.output_layer_init_method, 1),
    ):
        drawn = torch.empty(weight.shape, dtype=weight.dtype)
        initialize_affine_weight_cpu(
            drawn,
            *full_shape,
            weight.shape[dim],
            dim,
            init,
            stride=stride,
            params_dtype=weight.dtype,
            rank=rank,
            world_size=world,
            skip_set_tensor_parallel_attributes=True,
        )
        with torch.no_grad():
            weight.copy_(drawn)


def seeded_grouped_experts_class() -> type:
    """Transformer Engine's ``TEGroupedMLP`` with each expert redrawn as
    ``seeded_experts_class`` draws it, so grouped and sequential experts, at any expert
    layout, start from the same weights."""

    def make_init():
        layer_key = _draw_layer_key()

        def init_expert(config, global_index: int, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
            draw_expert_weights(config, layer_key, global_index, fc1, fc2)

        return init_expert

    return _ends_on_a_keyed_stream(grouped_mlp_with_expert_init(make_init))
