"""Reading and writing Hugging Face weight folders, safetensors only.

Nothing here unpickles: a folder whose weights exist only as ``pytorch_model.bin`` (or any
other pickle) is refused with the command that converts it. Reads are lazy (one tensor at
a time from memory-mapped files); writes go shard by shard, so memory holds at most one
shard of converted tensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class SafetensorsFolder:
    """Tensors of a Hugging Face folder (``model.safetensors`` or an index of shards)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder} is not a folder")
        self._files: Dict[str, Path] = self._weight_map()
        self._handles: Dict[Path, object] = {}

    def _weight_map(self) -> Dict[str, Path]:
        from safetensors import safe_open

        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.folder / file for name, file in weight_map.items()}
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
            with safe_open(str(path), framework="pt") as handle:
                mapping.update({name: path for name in handle.keys()})
        return mapping

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            if not path.is_file():
                raise ConversionError(f"{path} is listed in {SAFETENSORS_INDEX} but missing")
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def keys(self) -> List[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise ConversionError(f"{self.folder} lacks the tensor {name}")
        return self._handle(self._files[name]).get_tensor(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

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
        from safetensors.torch import save_file

        shard_number = len(self._shards) + 1
        save_file(
            self._buffer,
            str(self.folder / f".shard-{shard_number:05d}.safetensors"),
            metadata={"format": "pt"},
        )
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


def check_output_folder(folder, *, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"output {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConversionError(
            f"output folder {folder} is not empty; choose another folder or "
            f"pass --overwrite to replace it"
        )
    return folder


@contextmanager
def staged_output(folder, *, overwrite: bool) -> Iterator[Path]:
    """Write into a hidden sibling folder and move it into place only when complete,
    so a failed conversion never leaves a half-written output behind."""
    folder = check_output_folder(folder, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


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
