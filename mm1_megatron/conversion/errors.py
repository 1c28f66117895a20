"""Errors raised by the converters: all are ``ValueError`` (a user's input is wrong)."""

from __future__ import annotations

from typing import Sequence


class ConversionError(ValueError):
    """An unsupported architecture, a missing tensor, a shape mismatch, a bad folder."""


def shape_mismatch(
    name: str, expected: Sequence[int], got: Sequence[int], *, expected_from: str, got_from: str
) -> ConversionError:
    """The error for a tensor whose shape differs from what the config implies."""
    return ConversionError(
        f"tensor {name}: {got_from} has shape {tuple(got)} but {expected_from} expects "
        f"{tuple(expected)}; the weights and their config disagree"
    )


def unsupported(what: str, value, hint: str) -> ConversionError:
    return ConversionError(f"unsupported {what}: {value!r}. {hint}")
