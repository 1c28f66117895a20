"""A CPU contract stand-in for NVIDIA Transformer Engine 2.14 (tests only).

Put ``tests/te/standin`` first on ``PYTHONPATH`` and ``import transformer_engine`` finds this
package: Megatron-Core's real TE wrappers (``megatron/core/extensions/transformer_engine.py``)
then subclass the stand-in modules of ``transformer_engine.pytorch`` and run on CPU.

Followed release: TE v2.14 (``github:NVIDIA/TransformerEngine`` tag ``v2.14``). Like the
real top-level package (``transformer_engine/__init__.py``), importing it imports
``transformer_engine.common`` and ``transformer_engine.pytorch``. ``__version__`` is what
Megatron-Core's ``get_te_version`` reads; the sibling ``transformer_engine-2.14.0.dist-info``
answers ``importlib.metadata.version("transformer-engine")`` the same way.

Anything not written here does not exist: ``te.pytorch.ops.SwiGLU`` and friends raise
``AttributeError`` naming the attribute, a missing submodule raises ``ImportError``.
"""

STANDIN = True  # the real package has no such attribute; tests/te/conftest.py reads the path
__version__ = "2.14.0"

from . import common, pytorch  # noqa: E402,F401
