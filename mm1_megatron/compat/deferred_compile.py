"""Megatron-Core's fused functions are compiled when first called, not when megatron-core
is imported.

``megatron.core.jit`` sets ``jit_fuser = torch.compile``, and about a dozen modules decorate
functions with it at import time (``fusions/fused_bias_geglu.py`` is the first, reached
from ``TransformerConfig``); 0.19's ``transformer/moe/router.py`` also decorates a method
with ``@torch.compile`` itself. Decorating with ``torch.compile`` imports ``torch._dynamo``
and ``torch._inductor``: 1.7-1.8 CPU-s of every process's 5.3-6.4 s import of the
trainer on a CPU (``tools/bench_import.py``), paid by every rank even when no compiled
function ever runs (CPU runs, Transformer Engine's own fusions, ``bias_*_fusion: false``,
dense models).

``defer_megatron_compile()`` (called from ``mm1_megatron/__init__.py``, before anything can
import megatron-core) watches for those two modules. Right after ``megatron.core.jit`` runs,
its ``jit_fuser`` becomes ``deferred_compile``; while the router module runs, so does
``torch.compile`` (restored when it is done). A decorated function is handed to
``torch.compile`` on its first call, with the options megatron-core gave, so what runs is
what ran before, minus the import at start-up. Stdlib only: this module is imported by
``import mm1_megatron``, which must not import torch.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any, Callable, Optional

from mm1_megatron.compat.patching import register_patch, replace_attribute

logger = logging.getLogger(__name__)

JIT_MODULE = "megatron.core.jit"
ROUTER_MODULE = "megatron.core.transformer.moe.router"
REASON = (
    "decorating with torch.compile imports torch._inductor at megatron-core's import "
    "(1.7-1.8 CPU-s per process); compile on first call instead"
)
WRITTEN_FOR = "megatron-core 0.16.1-0.19.2 (jit_fuser = torch.compile), torch 2.10-2.13"


def deferred_compile(function: Optional[Callable] = None, **options: Any) -> Callable:
    """``torch.compile(function, **options)``, built on the first call; used bare
    (``@deferred_compile``) or with options (``@deferred_compile(dynamic=True)``)."""
    if function is None:
        return functools.partial(deferred_compile, **options)
    compiled: Optional[Callable] = None

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = _torch_compile()(function, **options)
        return compiled(*args, **kwargs)

    call.__wrapped_by_mm1__ = "deferred_compile"
    return call


def _torch_compile() -> Callable:
    import torch

    # While the router module runs, torch.compile is the recorder below: use torch's own.
    return _original_torch_compile["function"] if _router_window["open"] else torch.compile


_original_torch_compile: dict = {}
_router_window = {"open": False}


def _replace_jit_fuser(module: Any) -> None:
    fuser = getattr(module, "jit_fuser", None)
    compile_function = getattr(getattr(module, "torch", None), "compile", None)
    if fuser is not None and fuser is not compile_function:
        # Another release chose another fuser (torch.jit.script, a no-op): nothing to defer.
        logger.debug("megatron.core.jit.jit_fuser is %r; left as it is", fuser)
        return
    replace_attribute(module, "jit_fuser", deferred_compile, reason=REASON, written_for=WRITTEN_FOR)


def _run_router_with_deferred_compile(run_module: Callable, module: Any) -> None:
    import torch

    decorated = []

    def recording(function: Optional[Callable] = None, **options: Any) -> Callable:
        decorated.append(function)
        return deferred_compile(function, **options)

    _original_torch_compile["function"] = torch.compile
    torch.compile, _router_window["open"] = recording, True
    try:
        run_module(module)
    finally:
        torch.compile, _router_window["open"] = _original_torch_compile["function"], False
    if decorated:  # 0.19 decorates a router method; 0.16 nothing (no patch to report)
        register_patch(
            "torch.compile (while megatron.core.transformer.moe.router is imported)",
            reason=REASON,
            written_for="megatron-core 0.19.2 (@torch.compile on a router method), torch 2.10-2.13",
        )


class _MegatronModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the two modules like the import system would and runs them as described."""

    def __init__(self) -> None:
        self.pending = {JIT_MODULE, ROUTER_MODULE}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            if name == ROUTER_MODULE:
                _run_router_with_deferred_compile(run_module, module)
            else:
                run_module(module)
                _replace_jit_fuser(module)

        spec.loader.exec_module = exec_module
        return spec


def defer_megatron_compile() -> bool:
    """Install the finder; False when megatron-core was imported already (then its
    functions were decorated eagerly and nothing changes)."""
    if JIT_MODULE in sys.modules:
        logger.debug(
            "%s was imported before mm1_megatron; its fusions compiled eagerly", JIT_MODULE
        )
        return False
    if not any(isinstance(finder, _MegatronModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronModuleFinder())
    return True
