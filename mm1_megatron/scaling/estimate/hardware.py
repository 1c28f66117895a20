"""GPU types for ``mm1 estimate``: memory, peak FLOP/s and link bandwidths, each a named
assumption (sources in ``docs/scaling.md``).

Bandwidths are what NCCL achieves, not the links' nominal rates: the *bus* bandwidth of a
ring collective inside a node (NVLink), and one NIC per GPU between nodes (InfiniBand),
which is how DGX/HGX H100, H200 and A100 systems are built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from mm1_megatron.training.flops import dense_bf16_peak_flops

GIB = 2**30


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_bytes: int  # what the driver reports as total device memory
    peak_bf16_flops: float  # dense, per GPU
    intra_node_bus_bytes_per_s: float  # NCCL bus bandwidth over NVLink (ring)
    inter_node_bytes_per_s: float  # per GPU: one NIC each, NCCL-achieved
    hbm_bytes_per_s: float  # for the (memory-bound) optimizer step
    gpus_per_node: int = 8

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def _peak(name: str) -> float:
    peak = dense_bf16_peak_flops(name)
    assert peak is not None, name  # the table in training/flops.py lists every type here
    return peak


# Memory: nvidia-smi totals (H100 SXM 81,559 MiB; H200 143,771 MiB; A100 80 GB 81,920 MiB).
# Peaks: training/flops.py (dense BF16, the same numbers MFU uses).
# NVLink 4 (H100, H200): 450 GB/s per direction, NCCL ring bus bandwidth ~370 GB/s;
# NVLink 3 (A100): 300 GB/s per direction, ~230 GB/s achieved.
# InfiniBand: NDR 400 Gb/s per GPU (H100, H200), NCCL achieves ~46 GB/s; HDR 200 Gb/s per
# GPU (DGX A100), ~23 GB/s. HBM: 3.35 TB/s (H100 SXM), 4.8 TB/s (H200), 2.04 TB/s (A100 80GB).
GPU_TYPES: Dict[str, GpuType] = {
    "h100": GpuType(
        name="H100 SXM 80GB",
        memory_bytes=81559 * 2**20,
        peak_bf16_flops=_peak("H100"),
        intra_node_bus_bytes_per_s=370e9,
        inter_node_bytes_per_s=46e9,
        hbm_bytes_per_s=3.35e12,
    ),
    "h200": GpuType(
        name="H200 SXM 141GB",
        memory_bytes=143771 * 2**20,
        peak_bf16_flops=_peak("H200"),
        intra_node_bus_bytes_per_s=370e9,
        inter_node_bytes_per_s=46e9,
        hbm_bytes_per_s=4.8e12,
    ),
    "a100": GpuType(
        name="A100 SXM 80GB",
        memory_bytes=81920 * 2**20,
        peak_bf16_flops=_peak("A100"),
        intra_node_bus_bytes_per_s=230e9,
        inter_node_bytes_per_s=23e9,
        hbm_bytes_per_s=2.04e12,
    ),
}


def gpu_type(name: str) -> GpuType:
    """The GPU type named ``h100``, ``h200`` or ``a100`` (case-insensitive)."""
    key = name.lower()
    if key not in GPU_TYPES:
        raise ValueError(f"--gpu-type={name!r} is not one of {sorted(GPU_TYPES)}")
    return GPU_TYPES[key]


def link_bandwidth(gpu: GpuType, group_span_gpus: int) -> float:
    """Bandwidth of a collective over a group whose ranks span ``group_span_gpus``
    consecutive GPUs: NVLink when that fits in one node, else InfiniBand."""
    if group_span_gpus <= gpu.gpus_per_node:
        return gpu.intra_node_bus_bytes_per_s
    return gpu.inter_node_bytes_per_s
