"""The configuration reference documents every config field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mm1_megatron.config.schema import MM1Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _fields(cls, prefix=""):
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type) or (
                isinstance(field.type, str) and field.default_factory is not dataclasses.MISSING
                and dataclasses.is_dataclass(field.default_factory)):
            yield from _fields(field.default_factory, f"{prefix}{field.name}.")
        else:
            yield prefix, field.name


def test_every_config_field_is_in_the_reference():
    text = DOC.read_text()
    documented = set(re.findall(r"`([a-z_0-9.]+)`", text))
    missing = [f"{prefix}{name}" for prefix, name in _fields(MM1Config)
               if name not in documented and f"moe.{name}" not in documented]
    assert not missing, f"undocumented config fields in docs/configuration.md: {missing}"
