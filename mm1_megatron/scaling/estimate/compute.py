"""Training FLOPs by component, per sequence and per pipeline stage: the count MFU uses
(``mm1_megatron/training/flops.py``: matmuls only, 2 FLOPs per multiply-add, 3x the
forward for forward + backward, decoder attention over the causal pairs of each
document, the ViT's over all patch pairs, active experts only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from mm1_megatron.config.schema import ModelConfig
from mm1_megatron.scaling.estimate.stages import Stage
from mm1_megatron.scaling.estimate.workload import Workload, vision_tokens_per_image
from mm1_megatron.training import flops

TRAIN = flops.FORWARD_AND_BACKWARD


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs (forward + backward) of one sequence, by component."""

    vision_encoder: float
    connector: float
    decoder_layers: float  # the layers' weight matmuls, active experts only
    decoder_attention: float  # Q K^T and scores x V over the causal pairs
    output_layer: float

    @property
    def total(self) -> float:
        return (
            self.vision_encoder
            + self.connector
            + self.decoder_layers
            + self.decoder_attention
            + self.output_layer
        )

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "total": self.total}


def flops_per_sequence(model: ModelConfig, w: Workload) -> FlopsBreakdown:
    images, size = w.images_per_sequence, w.image_size
    layers = sum(
        flops.decoder_layer_forward_flops(model, w.seq_length, i, attention_pairs=0)
        for i in range(model.llm.num_layers)
    )
    return FlopsBreakdown(
        vision_encoder=TRAIN * images * flops.vision_encoder_forward_flops(model, size),
        connector=TRAIN * images * flops.connector_forward_flops(model, size),
        decoder_layers=TRAIN * layers,
        decoder_attention=TRAIN
        * flops.decoder_attention_forward_flops(model, w.attention_pairs_per_sequence),
        output_layer=TRAIN * flops.output_layer_forward_flops(model, w.seq_length),
    )


@dataclass(frozen=True)
class StageFlops:
    """Forward FLOPs of one micro-batch on a stage: what tensor parallelism splits, what
    every TP rank repeats (the connector), and the core attention (which selective
    recomputation runs twice)."""

    split: float
    replicated: float
    attention: float  # part of ``split``: decoder and ViT core attention
    transformer_layers: float  # part of ``split``: what full recomputation runs again


def stage_forward_flops(model: ModelConfig, w: Workload, stage: Stage, micro: int) -> StageFlops:
    pairs = w.attention_pairs_per_sequence
    split = replicated = attention = layers = 0.0
    if stage.has_vision and w.images_per_sequence:
        images = w.images_per_sequence * micro
        v = model.vision
        vit = images * flops.vision_encoder_forward_flops(model, w.image_size)
        tokens = vision_tokens_per_image(model, w)
        vit_attention = images * 2 * v.num_layers * tokens * 2 * tokens * v.hidden_size
        split += vit
        attention += vit_attention
        layers += vit
        replicated += images * flops.connector_forward_flops(model, w.image_size)
    per_layer_attention = flops.decoder_attention_forward_flops(model, pairs) / model.llm.num_layers
    for index in stage.decoder_layers:
        layer = micro * flops.decoder_layer_forward_flops(model, w.seq_length, index, pairs)
        split += layer
        layers += layer
        attention += micro * per_layer_attention
    if stage.has_output:
        split += micro * flops.output_layer_forward_flops(model, w.seq_length)
    return StageFlops(split, replicated, attention, layers)
