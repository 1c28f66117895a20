"""Where an import reads a vision folder's image processor settings from."""

from __future__ import annotations

import json

import pytest

from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.conversion.siglip2 import image_processor_values


def test_preprocessor_config_is_read_first(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_num_patches": 64}))
    nested = {"image_processor": {"max_num_patches": 1024}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert image_processor_values(tmp_path)[0] == {"max_num_patches": 64}


def test_a_whole_processor_saved_by_transformers_5_is_read_from_its_section(tmp_path):
    section = {"max_num_patches": 1024, "image_mean": [0.1] * 3, "image_std": [0.2] * 3}
    saved = {"processor_class": "Siglip2Processor", "image_processor": section}
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    values, path = image_processor_values(tmp_path)
    assert values == section and path.name == "processor_config.json"


def test_no_processor_files_give_no_settings(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
    assert image_processor_values(tmp_path)[0] == {}


def test_damaged_settings_are_refused_naming_the_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="preprocessor_config.json is not valid JSON"):
        image_processor_values(tmp_path)
