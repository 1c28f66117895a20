"""``MM1HFConfig``: the ``transformers`` config of an exported MM1 model.

A CLIP, SigLIP or SigLIP 2 (NaFlex, native resolution) vision tower, our connector, a
causal LM. Copied into every exported MM1
folder (``auto_map``), so it imports only the standard library and ``transformers``.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MM1HFConfig(PreTrainedConfig):
    """Hugging Face config of an exported MM1 model (``model_type: mm1``).

    ``vision_config`` is a ``CLIPVisionConfig``, a ``SiglipVisionConfig`` or a
    ``Siglip2VisionConfig`` (no pooling head), ``text_config`` the config of the exported
    decoder (Llama, Qwen2, Mixtral or Qwen2-MoE), ``connector_config`` the fields of our
    ``model.connector`` section. Each image is ``num_image_tokens`` copies of
    ``image_token_id`` in ``input_ids``.
    """

    model_type = "mm1"
    # As transformers marks a class loaded with trust_remote_code: save_pretrained() then
    # writes this file next to config.json and names it in auto_map, so a folder saved from
    # a model loaded through our package also loads where the package is not installed.
    _auto_class = "AutoConfig"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_config: dict | None = None
    image_token_id: int = 0
    num_image_tokens: int = 144
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.connector_config is None:
            self.connector_config = {"type": "mlp", "num_readout_layers": 2}
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
