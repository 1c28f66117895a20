"""Edit Megatron-Core layer specs the same way on every supported release.

megatron-core 0.16 describes a layer's MLP (and a MoE layer's experts) as
``ModuleSpec(module=..., submodules=...)``; 0.19 describes them as
``functools.partial(module_or_builder, submodules=...)``. The helpers here read and
rebuild either form, and never mutate a spec in place (0.19 shares one spec object
between all layers of a kind).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

from megatron.core.transformer.spec_utils import ModuleSpec


def spec_module(builder: Any) -> Any:
    """The class (or builder function) a spec or partial constructs."""
    if isinstance(builder, ModuleSpec):
        return builder.module
    if isinstance(builder, functools.partial):
        return builder.func
    return builder


def spec_submodules(builder: Any) -> Optional[Any]:
    """The submodules dataclass of a spec or partial (None for a bare class)."""
    if isinstance(builder, ModuleSpec):
        return builder.submodules
    if isinstance(builder, functools.partial):
        return builder.keywords.get("submodules")
    return None


def with_module(builder: Any, module: Any) -> Any:
    """A copy of ``builder`` that constructs ``module`` with the same arguments."""
    if isinstance(builder, ModuleSpec):
        return dataclasses.replace(builder, module=module)
    if isinstance(builder, functools.partial):
        return functools.partial(module, *builder.args, **builder.keywords)
    return module


def with_submodules(builder: Any, submodules: Any) -> Any:
    """A copy of ``builder`` with other submodules."""
    if isinstance(builder, ModuleSpec):
        return dataclasses.replace(builder, submodules=submodules)
    if isinstance(builder, functools.partial):
        return functools.partial(
            builder.func, *builder.args, **{**builder.keywords, "submodules": submodules}
        )
    raise TypeError(f"{builder!r} has no submodules to replace")


def with_params(spec: ModuleSpec, **params: Any) -> ModuleSpec:
    """A copy of a ``ModuleSpec`` with ``params`` merged into its constructor params."""
    return dataclasses.replace(spec, params={**spec.params, **params})


def replace_fields(submodules: Any, **fields: Any) -> Any:
    """A copy of a submodules dataclass with some fields replaced."""
    return dataclasses.replace(submodules, **fields)


def map_experts(mlp_builder: Any, transform: Callable[[Any], Any]) -> Any:
    """Apply ``transform`` to the experts builder of a MoE MLP; dense MLPs are returned
    unchanged."""
    submodules = spec_submodules(mlp_builder)
    experts = getattr(submodules, "experts", None)
    if experts is None:
        return mlp_builder
    return with_submodules(mlp_builder, replace_fields(submodules, experts=transform(experts)))


def map_layers(
    block: Any, transform: Callable[[ModuleSpec], ModuleSpec], **block_fields: Dict[str, Any]
) -> Any:
    """A copy of a ``TransformerBlockSubmodules`` with every layer spec transformed."""
    return dataclasses.replace(
        block, layer_specs=[transform(layer) for layer in block.layer_specs], **block_fields
    )
