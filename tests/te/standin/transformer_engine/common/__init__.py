"""``transformer_engine.common``: only the FP8 recipe classes (``common/recipe``)."""

from . import recipe  # noqa: F401
