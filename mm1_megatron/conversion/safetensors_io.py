"""Reading and writing Hugging Face weight folders, safetensors only.

Nothing here unpickles: a folder whose weights exist only as ``pytorch_model.bin`` (or any
other pickle) is refused with the command that converts it. Reads are lazy (one tensor at
a time from memory-mapped files); writes go shard by shard, so memory holds at most one
shard of converted tensors.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError

from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _damaged(path: Path, exc: Exception, tensor: Optional[str] = None) -> ConversionError:
    if tensor is None:
        problem = f"{path} is not a readable safetensors file ({exc}): it is truncated or damaged"
    else:
        problem = (
            f"cannot read {tensor} from {path} ({exc}): the file is truncated or damaged, "
            f"or its index names a tensor it lacks"
        )
    return ConversionError(problem + "; copy or download it again")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise _damaged(path, exc) from None


def _read_index(index: Path) -> Dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"cannot read {index} ({type(exc).__name__}: {exc}); it should be JSON with a "
            f"'weight_map' of tensor name -> shard file: copy or download it again"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


class SafetensorsFolder:
    """Tensors of a Hugging Face folder (``model.safetensors`` or an index of shards)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder} is not a folder")
        self._handles: Dict[Path, object] = {}
        self._files: Dict[str, Path] = self._weight_map()

    def _weight_map(self) -> Dict[str, Path]:
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            mapping = {name: self.folder / file for name, file in _read_index(index).items()}
            missing = sorted({path.name for path in mapping.values() if not path.is_file()})
            if missing:
                raise ConversionError(
                    f"{self.folder / missing[0]} is listed in {index} but missing"
                    + (f" ({len(missing)} shards missing)" if len(missing) > 1 else "")
                    + "; copy or download the folder again"
                )
            for path in sorted(set(mapping.values())):
                self._handle(path)  # a damaged shard is refused before any work
            return mapping
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (
                f" It has only pickle files ({', '.join(pickled)}), which this tool never "
                f"loads: re-save them as safetensors with a trusted tool first, e.g. "
                f"`model.save_pretrained(folder, safe_serialization=True)`."
                if pickled
                else ""
            )
            raise ConversionError(f"{self.folder} has no *.safetensors weights.{hint}")
        mapping = {}
        for path in files:
            mapping.update({name: path for name in self._handle(path).keys()})
        return mapping

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise ConversionError(f"{path} is listed in {SAFETENSORS_INDEX} but missing")
            self._handles[path] = _open_safetensors(path)
        return self._handles[path]

    def keys(self) -> List[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise ConversionError(f"{self.folder} lacks the tensor {name}")
        path = self._files[name]
        try:
            return self._handle(path).get_tensor(name)
        except SafetensorError as exc:
            raise _damaged(path, exc, name) from None

    def shape(self, name: str) -> tuple:
        path = self._files[name]
        try:
            return tuple(self._handle(path).get_slice(name).get_shape())
        except SafetensorError as exc:
            raise _damaged(path, exc, name) from None

    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the first one found)."""
        for name in self._files:
            tensor = self.get(name)
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def find_prefix(self, suffix: str) -> Optional[str]:
        """The prefix before ``suffix`` of the (shortest) key ending with it, or None."""
        matches = sorted((k for k in self._files if k.endswith(suffix)), key=len)
        return matches[0][: -len(suffix)] if matches else None


def save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, its I/O errors (a full disk) as ``OSError``."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        raise OSError(errno.EIO, str(exc), str(path)) from None


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000N.safetensors`` shards plus the index."""

    def __init__(self, folder: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self._seen: set = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise AssertionError(f"{name} written twice")
        self._seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        # A clone owns its storage: views of one fused tensor cannot be saved together.
        self._buffer[name] = tensor.detach().contiguous().clone()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        shard_number = len(self._shards) + 1
        save_tensors(self._buffer, self.folder / f".shard-{shard_number:05d}.safetensors")
        self._shards.append(sorted(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> Path:
        """Flush, give the shards their final names and write the index."""
        if self._buffer or not self._shards:
            self._flush()
        num_shards = len(self._shards)
        weight_map = {}
        for number, names in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
            (self.folder / f".shard-{number:05d}.safetensors").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = self.folder / SAFETENSORS_INDEX
        path.write_text(json.dumps(index, indent=2) + "\n")
        logger.info(
            "wrote %d tensors (%.1f MB) in %d shard(s)",
            len(weight_map),
            self.total_bytes / 1e6,
            num_shards,
        )
        return path


def tensor_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` -> the torch dtype."""
    dtypes = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in dtypes:
        raise ConversionError(f"dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
