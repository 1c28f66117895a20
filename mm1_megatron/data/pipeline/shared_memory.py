"""Batches of images built in shared memory inside DataLoader workers.

A worker hands each batch to the trainer through a queue, which moves every tensor not
already in shared memory into it: one more copy of the images (27 MB for a micro-batch of
16 MM1 images, about a tenth of decoding them; ``tools/bench_data.py --parts loaders``).
``torch.utils.data.default_collate`` avoids it by allocating its batches in shared memory;
so do ``stack_images`` (a sequence's images), ``NativeResolution.pack`` (a sequence's
native-resolution images as 2-D packed patches) and ``concat_images`` (a micro-batch's,
of either form), and each copies the images once. In the main process they allocate as
``torch`` does.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def shared_in_worker(shape: Sequence[int], like: torch.Tensor) -> Optional[torch.Tensor]:
    """An ``out=`` tensor of ``shape`` and ``like``'s dtype, in shared memory when called in
    a DataLoader worker; ``None`` (torch allocates) elsewhere or when empty."""
    numel = math.prod(shape)
    if torch.utils.data.get_worker_info() is None or numel == 0:
        return None
    # torch's own default_collate allocates its batches with these private calls; were
    # they gone, batches are allocated as before and copied once more by the queue.
    typed_storage = getattr(like, "_typed_storage", None)
    new_shared = getattr(typed_storage() if typed_storage else None, "_new_shared", None)
    if new_shared is None:
        return None
    return like.new(new_shared(numel, device=like.device)).view(*shape)


def _one_dtype(images: Sequence[torch.Tensor]) -> bool:
    """``out=`` would cast to the first image's dtype where torch promotes: not then."""
    return len({image.dtype for image in images}) == 1


def stack_images(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n, 3, H, W]`` from ``n >= 1`` decoded ``[3, H, W]`` images."""
    if not _one_dtype(pixels):
        return torch.stack(list(pixels))
    shape = (len(pixels), *pixels[0].shape)
    return torch.stack(list(pixels), out=shared_in_worker(shape, pixels[0]))


def concat_images(images: List[torch.Tensor]) -> torch.Tensor:
    """The sequences' images as one tensor, copied at most once: a micro-batch of one
    sequence keeps that sequence's tensor (in a worker, when ``stack_images`` already put
    it in shared memory)."""
    in_worker = torch.utils.data.get_worker_info() is not None
    if len(images) == 1 and (images[0].is_shared() or not in_worker):
        return images[0]
    if not _one_dtype(images):
        return torch.cat(images)
    shape = (sum(int(image.shape[0]) for image in images), *images[0].shape[1:])
    return torch.cat(images, out=shared_in_worker(shape, images[0]))
