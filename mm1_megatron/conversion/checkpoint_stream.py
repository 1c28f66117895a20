"""Read a checkpoint's model tensors a few at a time, without building the model.

An export must not hold a 30B model in memory. ``CheckpointTensors`` builds our TP=1
``MM1Model`` on the meta device (no storage) and keeps its ``sharded_state_dict()``: for
every tensor, the checkpoint key, global shape and offset (the stacked layer and expert
axes included). ``fetch`` then reads just those regions of the stored tensors. A
``torch_dist`` checkpoint is a ``torch.distributed.checkpoint`` folder whose tensors are
stored in chunks (one per layer and TP/EP shard), so one decoder layer costs one layer's
bytes, whatever TP/PP/EP layout wrote it.

Why not ``dist_checkpointing.load`` with a partial state dict: in a one-process world it
describes the shards it is not loading as belonging to rank ``(0 + 1) % 1 == 0`` and
torch then refuses the sharded tensor (megatron-core 0.16). The reads below use torch's
public planner interface instead; tensors are deserialised with ``weights_only=True``,
``.metadata`` with the allowlist unpickler of ``compat/safe_pickle.py``, and byte items are
never read.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mm1_megatron.compat.checkpointing import install_safe_loading
from mm1_megatron.config.schema import ModelConfig, ModelPart
from mm1_megatron.conversion.errors import ConversionError, shape_mismatch

Region = Tuple[Tuple[int, ...], torch.Tensor]  # (global offset, destination tensor)


class _RegionPlanner(LoadPlanner):
    """Reads one dense box of each stored tensor into a destination tensor of its shape."""

    def __init__(self, regions: Dict[str, Region]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata: Metadata = None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        requests: List[ReadItem] = []
        for key, (offset, destination) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=destination.shape)
            requests += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk]
            )
        return LoadPlan(requests)

    def create_global_plan(self, global_plan: List[LoadPlan]) -> List[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError(f"{read_item.dest_index.fqn} is not a tensor")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        destination = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            destination = destination.narrow(dim, start, length)
        return destination

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _stored_pieces(entry):
    """What an entry is stored as: itself (a ``ShardedTensor``), or the nested
    ``ShardedTensor``s a factory builds (SwiGLU's ``linear_fc1`` is ``[gate; up]``, stored
    as two halves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return entry.build() if isinstance(entry, ShardedTensorFactory) else entry


def _leaves(pieces) -> List:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return [pieces] if isinstance(pieces, ShardedTensor) else list(nested_values(pieces))


def _stored_box(leaf) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """A leaf's offset and shape in the stored tensor (prepended layer/expert axes of 1)."""
    assert leaf.flattened_range is None, f"{leaf.key}: flattened model tensors are unexpected"
    return tuple(leaf.global_offset), (1,) * leaf.prepend_axis_num + tuple(leaf.local_shape)


def _bounding_regions(leaves, dtype: torch.dtype) -> Dict[str, Region]:
    """One destination per stored key, covering all requested boxes of that key (a unit's
    boxes of one key are adjacent: the experts of a layer, the halves of ``linear_fc1``)."""
    boxes = defaultdict(list)
    for leaf in leaves:
        boxes[leaf.key].append(_stored_box(leaf))
    regions = {}
    for key, key_boxes in boxes.items():
        low = [min(offset[d] for offset, _ in key_boxes) for d in range(len(key_boxes[0][0]))]
        high = [max(offset[d] + shape[d] for offset, shape in key_boxes) for d in range(len(low))]
        shape = [hi - lo for hi, lo in zip(high, low)]
        assert torch.Size(shape).numel() == sum(torch.Size(s).numel() for _, s in key_boxes), (
            f"{key}: the requested pieces do not tile one box"
        )
        regions[key] = (tuple(low), torch.empty(shape, dtype=dtype))
    return regions


def _cut(leaf, regions: Dict[str, Region]) -> torch.Tensor:
    low, destination = regions[leaf.key]
    offset, shape = _stored_box(leaf)
    piece = destination
    for dim, (start, length) in enumerate(zip(offset, shape)):
        piece = piece.narrow(dim, start - low[dim], length)
    return piece.reshape(leaf.local_shape)


class CheckpointTensors:
    """The tensors of ``parts`` in a checkpoint written at any layout, by our TP=1 names
    (those of ``MM1Model.state_dict()``), read one unit at a time."""

    def __init__(
        self,
        step_folder: Path,
        model: ModelConfig,
        parts: Sequence[ModelPart],
        *,
        image_token_id: int,
        dtype: torch.dtype = torch.float32,
        select: Callable[[str], bool] = lambda name: True,
    ):
        """``select``: which of the model's names the checkpoint holds (a LoRA run's
        holds only what it trained)."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR
        from mm1_megatron.conversion import megatron_io

        self.folder = Path(step_folder) / MODEL_OPTIM_DIR
        self.dtype = dtype
        with torch.device("meta"):
            skeleton = megatron_io.build_tp1_model(
                megatron_io.placeholder_model_config(model, parts), image_token_id=image_token_id
            )
        prefixes = tuple(f"{part}." for part in parts)
        self._entries = {
            name: entry
            for name, entry in skeleton.sharded_state_dict().items()
            if name.startswith(prefixes) and not isinstance(entry, ShardedObject) and select(name)
        }
        self._pieces = {name: _stored_pieces(entry) for name, entry in self._entries.items()}
        install_safe_loading()  # .metadata through the allowlist, even outside init_distributed
        self._reader = FileSystemReader(str(self.folder))
        self._stored = self._reader.read_metadata().state_dict_metadata
        self.largest_fetch_bytes = 0
        self._check_against_metadata()

    def _check_against_metadata(self) -> None:
        """Every tensor we will ask for exists with the shape the config implies; fail now,
        naming the tensor and both shapes, rather than midway through the export."""
        missing = []
        for name, pieces in self._pieces.items():
            for leaf in _leaves(pieces):
                if leaf.key not in self._stored:
                    missing.append(leaf.key)
                    continue
                got = tuple(self._stored[leaf.key].size)
                if got != tuple(leaf.global_shape):
                    raise shape_mismatch(
                        leaf.key,
                        tuple(leaf.global_shape),
                        got,
                        expected_from=f"config.yaml (our {name}, layers/experts stacked)",
                        got_from=str(self.folder),
                    )
        if missing:
            raise ConversionError(
                f"{self.folder} lacks {len(missing)} tensors its config.yaml "
                f"implies, e.g. {sorted(missing)[0]}"
            )

    def names(self, prefix: str = "") -> List[str]:
        return [name for name in self._entries if name.startswith(prefix)]

    def fetch(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Read ``names`` (one unit: a layer, the embedding, ...) in one pass."""
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        names = list(names)
        unknown = [name for name in names if name not in self._entries]
        if unknown:
            raise ConversionError(f"the checkpoint's model has no tensor {unknown[0]}")
        regions = _bounding_regions(
            [leaf for name in names for leaf in _leaves(self._pieces[name])], self.dtype
        )
        dcp_load(
            {key: destination for key, (_, destination) in regions.items()},
            storage_reader=self._reader,
            planner=_RegionPlanner(regions),
            no_dist=True,
        )
        self.largest_fetch_bytes = max(
            self.largest_fetch_bytes, sum(d.numel() * d.element_size() for _, d in regions.values())
        )
        loaded = {}
        for name in names:
            entry, pieces = self._entries[name], self._pieces[name]
            if isinstance(entry, ShardedTensorFactory):
                loaded[name] = entry.merge_fn(
                    dict_list_map_outplace(lambda leaf: _cut(leaf, regions), pieces)
                )
            else:
                loaded[name] = _cut(pieces, regions)
        return loaded
