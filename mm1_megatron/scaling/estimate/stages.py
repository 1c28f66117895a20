"""What each pipeline stage holds: decoder layers, the vision stage's encoder and
connector, the last stage's output layer, and the parameters of one rank of it.

Stage 0 (the vision stage) holds the image encoder, the connector, the token embedding and
``parallel.num_decoder_layers_on_vision_stage`` layers; the last stage
``num_decoder_layers_on_last_stage`` layers, the final norm and the output layer; the
others share the rest evenly (``docs/parallelism.md``). Under the 1F1B schedule stage
``i`` of ``p`` holds the activations of ``min(m, p - i)`` micro-batches at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

from mm1_megatron.config.schema import MM1Config, ModelConfig
from mm1_megatron.models import param_count


@dataclass(frozen=True)
class Stage:
    index: int
    decoder_layers: Tuple[int, ...]  # global layer numbers
    has_vision: bool  # image encoder, connector and token embedding
    has_output: bool  # final norm, output layer and loss
    in_flight: int  # micro-batches whose activations it holds at its peak


def stage_layer_counts(
    num_layers: int, pp: int, first: Optional[int], last: Optional[int]
) -> List[int]:
    """Decoder layers per stage, as Megatron-Core splits them (validation guarantees
    that the unpinned stages share the rest evenly)."""
    if pp == 1:
        return [num_layers]
    pinned = {0: first, pp - 1: last}
    pinned = {i: n for i, n in pinned.items() if n is not None}
    free = pp - len(pinned)
    each = (num_layers - sum(pinned.values())) // free if free else 0
    return [pinned.get(i, each) for i in range(pp)]


def pipeline_stages(cfg: MM1Config, num_microbatches: int) -> List[Stage]:
    par = cfg.parallel
    pp = par.pipeline_parallel_size
    counts = stage_layer_counts(
        cfg.model.llm.num_layers,
        pp,
        par.num_decoder_layers_on_vision_stage,
        par.num_decoder_layers_on_last_stage,
    )
    stages, start = [], 0
    for i, count in enumerate(counts):
        stages.append(
            Stage(
                index=i,
                decoder_layers=tuple(range(start, start + count)),
                has_vision=i == 0,
                has_output=i == pp - 1,
                in_flight=min(num_microbatches, pp - i),
            )
        )
        start += count
    return stages


@dataclass(frozen=True)
class RankParameters:
    """Parameters on one rank of a stage, by how their gradients are reduced."""

    vision_encoder: float
    connector: float
    language_model: float  # dense decoder parts: reduced over data parallelism
    experts: float  # reduced over the expert-data-parallel group
    largest_tensor: float  # the biggest single weight (its gradient is a transient)

    @property
    def total(self) -> float:
        return self.vision_encoder + self.connector + self.language_model + self.experts


# Replicated on every tensor-parallel rank in a ViT layer: two LayerNorms (weight and
# bias) and the row-parallel biases of the output projection and fc2.
VIT_LAYER_REPLICATED_PER_HIDDEN = 6


def _vision_layer_params(model: ModelConfig) -> int:
    v = model.vision
    one = param_count.vision_encoder_params(dataclasses.replace(v, num_layers=1))
    return one - param_count.vision_encoder_params(dataclasses.replace(v, num_layers=0))


def rank_parameters(model: ModelConfig, parallel, stage: Stage) -> RankParameters:
    """Parameters one rank of ``stage`` holds under ``parallel`` (TP, EP, expert TP)."""
    tp, ep = parallel.tensor_parallel_size, parallel.expert_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    llm, v = model.llm, model.vision
    vocab_shard = llm.vocab_size * llm.hidden_size / tp
    vision = connector = language = experts = 0.0
    largest = 0.0
    if stage.has_vision:
        counts = param_count.count_parameters(model)
        per_layer = _vision_layer_params(model)
        replicated = VIT_LAYER_REPLICATED_PER_HIDDEN * v.hidden_size
        stem = counts.vision_encoder - v.num_layers * per_layer
        vision = stem + v.num_layers * ((per_layer - replicated) / tp + replicated)
        connector = counts.connector
        language += vocab_shard
        largest = max(largest, vocab_shard)
    if stage.has_output:
        language += llm.hidden_size  # final norm
        if not llm.tie_embeddings or not stage.has_vision:
            language += vocab_shard  # output layer, or the tied copy on the last stage
        largest = max(largest, vocab_shard)
    flags = param_count.moe_layer_flags(llm)
    for index in stage.decoder_layers:
        layer = param_count.decoder_layer_params(llm, flags[index])
        language += layer.norms + layer.router + (layer.attention + layer.dense_mlp) / tp
        experts += layer.experts / (ep * etp)
        largest = max(largest, layer.attention / tp, layer.dense_mlp / tp)
    return RankParameters(vision, connector, language, experts, largest)
