"""The MM1 model as a ``transformers`` model, in files that travel with every export.

- ``connectors_mm1.py``: the connectors as plain torch modules and the one table
  (``CONNECTORS``) that builds them, for training (``models/connectors.py``) and for the
  ``transformers`` model alike;
- ``configuration_mm1.py``: ``MM1HFConfig`` (``model_type: mm1``);
- ``modeling_mm1.py``: ``MM1ForConditionalGeneration``;
- ``image_processing_mm1.py`` / ``processing_mm1.py``: ``MM1ImageProcessor`` (tiles
  images as ``data.tiling`` does) and ``MM1Processor`` (expands ``<image>`` markers,
  returns a ``BatchFeature``): the processor ships with every MM1 export, the tiling
  image processor with exports of runs that tile their images (``PROCESSOR_CODE_FILES``);
- ``register.py``: registers them with the Auto classes.

The exporter copies the first three (``CODE_FILES``) into every MM1 folder and names them
in ``config.json``'s ``auto_map`` (``AUTO_MAP``), so the folder loads with
``trust_remote_code=True`` on a machine with only torch and transformers. They therefore
import nothing but the standard library, torch, transformers and each other (relatively);
a test checks that. Where our package is installed, ``import mm1_megatron.hf_model.register``
makes the Auto classes load the folder with these very modules and without remote code.

This ``__init__`` imports no ``transformers``: training imports the connectors through it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

CODE_FILES = ("configuration_mm1.py", "connectors_mm1.py", "modeling_mm1.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mm1.MM1HFConfig",
    "AutoModelForImageTextToText": "modeling_mm1.MM1ForConditionalGeneration",
}

PROCESSOR_CODE_FILES = ("image_processing_mm1.py", "processing_mm1.py")
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_mm1.MM1ImageProcessor",
    "AutoProcessor": "processing_mm1.MM1Processor",
}


def write_model_code(folder: Union[str, Path], names=CODE_FILES) -> None:
    """Copy ``names`` (``CODE_FILES`` by default) into ``folder`` (an export), for
    ``trust_remote_code`` loads."""
    here = Path(__file__).resolve().parent
    for name in names:
        shutil.copyfile(here / name, Path(folder) / name)
