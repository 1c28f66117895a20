"""LoRA adapters (Hu et al., 2021) on the model's linear layers, at any parallel layout.

An adapted layer computes ``W x + (alpha / r) * B A dropout(x)``: ``W`` frozen, ``A``
``[r, in]`` drawn (PEFT's Kaiming-uniform bound ``1 / sqrt(in)``), ``B`` ``[out, r]`` zero,
so training starts from the base model exactly.

The layer keeps its class: ``add_adapter`` switches the instance to a subclass of its own
class (Megatron-Core's column- and row-parallel linears, their Transformer Engine twins,
or ``torch.nn.Linear`` in the connector) that owns two more parameters, ``lora_a`` and
``lora_b``. The base weights keep their names, so a base checkpoint loads into an adapted
model unchanged, and nothing of Megatron-Core is patched.

Tensor parallelism splits an adapter the way it splits its layer:

- column-parallel ``W [out/tp, in]``: ``A`` whole on every rank, ``B [out/tp, r]`` split
  like ``W`` (for a gated ``linear_fc1`` in Megatron's ``[gate; up]`` layout, checkpointed
  as ``W`` is). ``h = A x`` is all-gathered along the sequence (SP) before ``B``, or
  copied with its gradient summed (no SP): ``r`` values per token, not ``in``.
- row-parallel ``W [out, in/tp]``: ``A [r, in/tp]`` split like ``W``, ``B`` whole.
  ``A x_local`` is summed over TP (reduce-scattered along the sequence under SP) before
  ``B``.
- experts with explicit communication (EP > 1 or expert-TP > 1): no collective inside the
  layer, as Megatron-Core's own expert linears; the token dispatcher gathers and reduces.

A whole factor that sees only part of the tokens (SP) or of the sum (row-parallel experts
at expert-TP > 1) gets its gradient summed over the group in the backward pass.

Initialisation is layout-independent: each ``A`` is drawn whole from a generator keyed by
the seed and the layer's global name (layer and expert numbers across pipeline stages and
expert ranks), then cut to this rank's share. Dropout masks are drawn from the default
generator, which every rank seeds alike (so masks are alike across TP and DP ranks); runs
with dropout > 0 are not layout-independent.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from dataclasses import replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

from mm1_megatron.config.schema import LoRAConfig
from mm1_megatron.parallel.collectives import all_reduce_

logger = logging.getLogger(__name__)

LORA_A, LORA_B = "lora_a", "lora_b"
ADAPTER_NAMES = (LORA_A, LORA_B)


def is_adapter_key(key: str) -> bool:
    """Whether a parameter / state-dict key names an adapter factor."""
    return key.rsplit(".", 1)[-1] in ADAPTER_NAMES


def adapted_stems(names) -> List[str]:
    """``<layer>.`` of every layer with an adapter among state-dict ``names``: its weight
    is ``stem + "weight"``, its factors ``stem + LORA_A`` and ``stem + LORA_B``."""
    return sorted(name[: -len(LORA_A)] for name in names if name.endswith("." + LORA_A))


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the gradient summed over ``group`` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_(grad.contiguous(), group=ctx.group), None


class _Adapter:
    """Mixed into an adapted layer's class by ``add_adapter``; never built on its own.

    Attributes set by ``add_adapter``: ``lora_kind`` ("column", "row", "replicated"),
    ``lora_active`` (False: the base layer, ``adapters_disabled``), ``lora_scale``,
    ``lora_dropout``, ``lora_explicit_comm``, ``lora_sequence_parallel``, ``lora_tp_group``
    (the group that splits the layer), ``lora_grad_group`` (the group over which the whole
    factor's gradient is summed, or None), ``lora_gated`` and ``lora_layernorm_output`` (a
    fused norm+linear of Transformer Engine returns its normalised input, which the adapter
    reads).
    """

    def forward(self, x, *args, **kwargs):
        output = super().forward(x, *args, **kwargs)
        if not self.lora_active:  # the base model (DPO's reference pass)
            if self.lora_layernorm_output:
                return (output[0], output[1]) if len(output) == 3 else (output[0][0], output[1])
            return output
        if not isinstance(output, tuple):  # torch.nn.Linear
            return output + self.lora_delta(x)
        if not self.lora_layernorm_output:
            out, bias = output
            return out + self.lora_delta(x), bias
        if len(output) == 3:  # TE with its bias returned: (out, bias, normalised input)
            out, bias, normalised = output
        else:  # ((out, normalised input), None)
            (out, normalised), bias = output
        return out + self.lora_delta(normalised), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A dropout(x)`` in this layer's output layout."""
        a, b = self.lora_a, self.lora_b
        x = self.lora_dropout(x)
        if self.lora_kind == "column":
            if self.lora_grad_group is not None:
                a = _SumGradOverGroup.apply(a, self.lora_grad_group)
            h = F.linear(x, a)
            if not self.lora_explicit_comm:
                group = self.lora_tp_group
                h = (
                    tensor_parallel.gather_from_sequence_parallel_region(h, group=group)
                    if self.lora_sequence_parallel
                    else tensor_parallel.copy_to_tensor_model_parallel_region(h, group=group)
                )
            return F.linear(h, b) * self.lora_scale
        h = F.linear(x, a)
        if self.lora_kind == "row" and not self.lora_explicit_comm:
            group = self.lora_tp_group
            h = (
                tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=group)
                if self.lora_sequence_parallel
                else tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=group)
            )
        if self.lora_grad_group is not None:
            b = _SumGradOverGroup.apply(b, self.lora_grad_group)
        return F.linear(h, b) * self.lora_scale


class _ShardedAdapter(_Adapter):
    """A parallel layer's adapter in checkpoints: the split factor sharded like ``W``."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # The base class saved both factors as whole (replicated) tensors; the split one
        # takes the weight's sharding instead, with its own size on the other axis.
        split = LORA_B if self.lora_kind == "column" else LORA_A
        weight = sharded[f"{prefix}weight"]
        data = getattr(self, split)
        global_shape = list(weight.global_shape)
        other_axis = -1 if split == LORA_B else -2
        global_shape[other_axis] = data.shape[other_axis]
        tensor = replace(
            weight,
            key=weight.key[: -len("weight")] + split,
            data=data,
            dtype=data.dtype,
            local_shape=tuple(data.shape),
            global_shape=tuple(global_shape),
        )
        if self.lora_gated:  # B's rows are [gate; up] per rank, as linear_fc1's weight
            singleton = (metadata or {}).get("singleton_local_shards", False)
            tensor = apply_swiglu_sharded_factory(tensor, sharded_offsets, singleton)
        sharded[f"{prefix}{split}"] = tensor
        return sharded


_ADAPTED_CLASSES: Dict[Tuple[type, type], type] = {}


def _adapted_class(base: type, mixin: type) -> type:
    """``LoRA<Base>``: one class per base class (checkpoints never pickle it)."""
    key = (base, mixin)
    if key not in _ADAPTED_CLASSES:
        attrs = {"lora_base_class": base}
        _ADAPTED_CLASSES[key] = type(f"LoRA{base.__name__}", (mixin, base), attrs)
    return _ADAPTED_CLASSES[key]


def parallel_kind(module: torch.nn.Module) -> Optional[str]:
    """ "column", "row" or "replicated" for a linear layer LoRA can adapt, else None."""
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    name = type(module).__name__
    if "Grouped" in name and ("ColumnParallel" in name or "RowParallel" in name):
        raise ValueError(
            f"model.lora cannot adapt {name} (grouped-GEMM experts); set "
            "model.llm.moe.grouped_gemm=false or leave linear_fc1/linear_fc2 out of "
            "model.lora.target_modules"
        )
    if "ColumnParallel" in name:  # Transformer Engine's twins
        return "column"
    if "RowParallel" in name:
        return "row"
    if isinstance(module, torch.nn.Linear):
        return "replicated"
    return None


def _tp_group(module):
    """The tensor-parallel group that splits ``module``: its own (an expert layer's is the
    expert-TP group), else the one Megatron-Core would give it."""
    group = getattr(module, "tp_group", None)
    if group is not None:
        return group
    if getattr(module, "is_expert", False):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _tp_rank_and_size(module) -> Tuple[int, int]:
    group = _tp_group(module)
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _explicit_expert_comm(module) -> bool:
    if hasattr(module, "explicit_expert_comm"):
        return bool(module.explicit_expert_comm)
    if not getattr(module, "is_expert", False):
        return False
    return (
        parallel_state.get_expert_tensor_parallel_world_size() > 1
        or parallel_state.get_expert_model_parallel_world_size() > 1
    )


def _grad_group(module, kind: str, explicit: bool, sequence_parallel: bool):
    """The group over which the whole factor's gradient must be summed, or None."""
    if kind == "replicated":
        return None
    _, size = _tp_rank_and_size(module)
    if size == 1 or not (explicit or sequence_parallel):
        return None
    return _tp_group(module)


def _drawn_a(rank: int, in_features: int, *, seed: int, name: str) -> torch.Tensor:
    """The whole ``A`` ``[rank, in_features]`` of layer ``name``: PEFT's
    ``kaiming_uniform_(a=sqrt(5))``, bound ``1 / sqrt(in_features)``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def add_adapter(module: torch.nn.Module, cfg: LoRAConfig, *, seed: int, name: str) -> None:
    """Give ``module`` (a linear layer; see ``parallel_kind``) a LoRA adapter in place;
    ``name``, the layer's global name, seeds ``A``."""
    kind = parallel_kind(module)
    assert kind is not None, f"{name} is not a linear layer"
    assert not getattr(module, "gather_output", False), f"{name} gathers its output"
    config = getattr(module, "config", None)
    gated = name.endswith("linear_fc1") and bool(getattr(config, "gated_linear_unit", False))
    weight = module.weight
    out_local, in_local = weight.shape
    tp_rank, tp_size = _tp_rank_and_size(module) if kind != "replicated" else (0, 1)
    in_full = in_local * tp_size if kind == "row" else in_local
    a = _drawn_a(cfg.rank, in_full, seed=seed, name=name)
    if kind == "row":
        a = a[:, tp_rank * in_local : (tp_rank + 1) * in_local]
    factors = {
        LORA_A: a.to(weight.device, weight.dtype),
        LORA_B: torch.zeros(out_local, cfg.rank, device=weight.device, dtype=weight.dtype),
    }
    for factor, data in factors.items():
        param = torch.nn.Parameter(data.contiguous())
        for attr in ("allreduce",):  # expert parameters reduce over the expert DP group
            if hasattr(weight, attr):
                setattr(param, attr, getattr(weight, attr))
        split = (kind == "column" and factor == LORA_B) or (kind == "row" and factor == LORA_A)
        if split:
            set_tensor_model_parallel_attributes(param, True, 0 if kind == "column" else 1, 1)
        module.register_parameter(factor, param)
    explicit = kind != "replicated" and _explicit_expert_comm(module)
    # Megatron-Core turns a layer's sequence parallelism off where its group is one rank.
    sequence_parallel = (
        bool(getattr(module, "sequence_parallel", False)) and not explicit and tp_size > 1
    )
    module.lora_kind = kind
    module.lora_active = True
    module.lora_scale = cfg.scale
    module.lora_dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else torch.nn.Identity()
    module.lora_explicit_comm = explicit
    module.lora_tp_group = _tp_group(module) if kind != "replicated" else None
    module.lora_sequence_parallel = sequence_parallel
    module.lora_grad_group = _grad_group(module, kind, explicit, sequence_parallel)
    module.lora_gated = gated and kind == "column"
    module.lora_layernorm_output = hasattr(module, "return_layernorm_output")
    if module.lora_layernorm_output:  # Transformer Engine's fused norm + linear
        module.return_layernorm_output = True
    mixin = _Adapter if kind == "replicated" else _ShardedAdapter
    module.__class__ = _adapted_class(type(module), mixin)


def has_adapter(module: torch.nn.Module) -> bool:
    return isinstance(module, _Adapter)


def merge_adapter(module: torch.nn.Module) -> None:
    """Fold the adapter into ``W`` (this rank's shard) and remove it: the layer computes
    the same function as before, as its original class."""
    assert has_adapter(module)
    with torch.no_grad():
        delta = module.lora_b.float() @ module.lora_a.float() * module.lora_scale
        module.weight.add_(delta.to(module.weight.dtype))
    for factor in ADAPTER_NAMES:
        delattr(module, factor)
    if module.lora_layernorm_output:
        module.return_layernorm_output = False
    module.__class__ = module.lora_base_class


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``W + scale * B A`` in float32, returned in ``W``'s dtype (whole tensors: export)."""
    delta = lora_b.float() @ lora_a.float() * scale
    return (weight.float() + delta).to(weight.dtype)


# ---- which layers, by name ---------------------------------------------------------------
_LAYER = re.compile(r"^(.*\blayers)\.(\d+)$")
_EXPERT = re.compile(r"^(.*\blocal_experts)\.(\d+)$")


def _global_prefixes(model: torch.nn.Module) -> Dict[str, str]:
    """Local module name -> global name for transformer layers (``layer_number`` counts
    across pipeline stages) and experts (``local_expert_indices`` across expert ranks)."""
    renames = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        layer = _LAYER.match(name)
        if layer and hasattr(module, "layer_number"):
            renames[name] = f"{layer.group(1)}.{module.layer_number - 1}"
        expert = _EXPERT.match(name)
        if expert:
            experts_owner = modules[name.rsplit(".local_experts", 1)[0]]
            offset = parallel_state.get_expert_model_parallel_rank() * len(
                experts_owner.local_experts
            )
            renames[name] = f"{expert.group(1)}.{offset + int(expert.group(2))}"
    return renames


def global_name(name: str, renames: Dict[str, str]) -> str:
    parts = name.split(".")
    out: List[str] = []
    for i in range(len(parts)):
        local = ".".join(parts[: i + 1])
        out = renames[local].split(".") if local in renames else out + [parts[i]]
    return ".".join(out)


def _targets(model: torch.nn.Module, cfg: LoRAConfig) -> Iterator[Tuple[str, torch.nn.Module]]:
    for part in cfg.parts:
        owner = getattr(model, part, None)
        if owner is None:  # not on this pipeline stage
            continue
        for name, module in owner.named_modules():
            if part == "connector":  # the readout MLP every connector type ends with
                chosen = isinstance(module, torch.nn.Linear) and ".readout." in f".{name}"
            else:
                chosen = name.rsplit(".", 1)[-1] in cfg.target_modules
            if chosen and parallel_kind(module) is not None:
                yield f"{part}.{name}", module


def add_adapters(model: torch.nn.Module, cfg: LoRAConfig, *, seed: int) -> int:
    """Adapters on ``cfg.target_modules`` of ``cfg.parts`` (the connector's readout MLP);
    every other weight frozen except ``cfg.fully_trained`` parts. Returns how many layers
    were adapted on this rank."""
    renames = _global_prefixes(model)
    targets = list(_targets(model, cfg))
    for name, module in targets:
        add_adapter(module, cfg, seed=seed, name=global_name(name, renames))
    for part_name, part in model.named_children():
        trained = part_name in cfg.fully_trained
        for param_name, param in part.named_parameters():
            param.requires_grad_(trained or is_adapter_key(param_name))
    return len(targets)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes its base model (the adapters are skipped)."""
    adapted = [m for m in model.modules() if has_adapter(m)]
    for module in adapted:
        module.lora_active = False
    try:
        yield
    finally:
        for module in adapted:
            module.lora_active = True


def merge_adapters(model: torch.nn.Module) -> int:
    """Fold every adapter into its weight (see ``merge_adapter``); returns how many."""
    adapted = [m for m in model.modules() if has_adapter(m)]
    for module in adapted:
        merge_adapter(module)
    return len(adapted)
