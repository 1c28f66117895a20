"""Demonstrations by image similarity (RICES, as OpenFlamingo's retrieval option), with
the evaluated model's own image encoder.

An image's feature is the mean of its connector output tokens (what the decoder sees),
L2-normalised; a query's demonstrations are the pool images of highest cosine
similarity, placed in the prompt with the most similar one last, next to the query. On a
pipeline-parallel run only the first stage holds the encoder: it computes the features
and broadcasts them to the other stages.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from mm1_megatron.evaluation.tasks.records import EvalExample
from mm1_megatron.parallel.collectives import broadcast_

ImageLoader = Callable[[EvalExample], torch.Tensor]
# A chunk's images as the encoder takes them: stacked (no grids), or packed patches and grids.
ImagePacker = Callable[[List[torch.Tensor]], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def stack_images(images: List[torch.Tensor]) -> Tuple[torch.Tensor, None]:
    return torch.stack(images), None


@torch.no_grad()
def image_features(
    model,
    examples: Sequence[EvalExample],
    load_image: ImageLoader,
    batch_size: int = 32,
    *,
    pack: ImagePacker = stack_images,
) -> torch.Tensor:
    """``[len(examples), hidden]`` unit vectors, the same on every rank of the model.
    ``pack``: ``PromptBuilder.pack`` for a native-resolution model (packed patches)."""
    first = parallel_state.is_pipeline_first_stage()
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    features = torch.empty(len(examples), hidden, dtype=torch.float32, device=device)
    if first:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            images, grids = pack([load_image(ex) for ex in chunk])
            native = {} if grids is None else {"image_grids": grids}
            tokens = model.encode_images(images.to(device, dtype), **native).float().mean(dim=1)
            features[start : start + len(chunk)] = torch.nn.functional.normalize(tokens, dim=-1)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        broadcast_(
            features,
            src=parallel_state.get_pipeline_model_parallel_first_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return features.cpu()


def most_similar(query: torch.Tensor, pool: torch.Tensor, count: int) -> List[List[int]]:
    """Per query row, the indices of the ``count`` most similar pool rows, most similar
    first."""
    similarity = query @ pool.T
    return similarity.topk(min(count, pool.shape[0]), dim=-1).indices.tolist()
