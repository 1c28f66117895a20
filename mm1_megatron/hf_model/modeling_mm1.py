"""``MM1ForConditionalGeneration``: the whole MM1 model as a ``transformers`` model.

The vision tower is a ``CLIPVisionModel``, a ``SiglipVisionModel`` or, for a
native-resolution ViT, a ``Siglip2VisionModel`` (its ``last_hidden_state``, without CLIP's
class token, is what our ViT returns), the connector is built by the very table training
uses (``connectors_mm1.build_connector_net``), and the language model is the standard
causal LM the decoder exports to. ``generate()`` takes ``input_ids`` in which each image
is a run of ``num_image_tokens`` image tokens, plus the processor's pixels; the images
are encoded once, in the prefill step, and the KV cache does the rest.

- Fixed resolution: ``pixel_values`` ``[n, c, H, W]``. Images (high-resolution tiles) of
  another size than the tower's ``image_size`` read its position table resized
  bicubically to their patch grid, as training's ViT does; ``MM1Processor``
  (``processing_mm1.py``) cuts the tiles.
- Native resolution (SigLIP 2 NaFlex): ``Siglip2ImageProcessor``'s ``pixel_values``
  ``[n, max_patches, c*p*p]`` (each image's ``h*w`` patches, then padding),
  ``pixel_attention_mask`` ``[n, max_patches]`` and ``spatial_shapes`` ``[n, 2]``. The
  tower runs on the padded batch (its attention mask keeps the images apart); each
  image's ``h*w`` rows then go, packed, through the connector on their own grid
  (``forward_grids``), which gives every image ``num_image_tokens`` tokens.

This file, ``configuration_mm1.py`` and ``connectors_mm1.py`` are copied into every
exported MM1 folder, whose ``config.json`` names them in ``auto_map``: the folder then
loads with ``trust_remote_code=True`` where only torch and transformers are installed.
So they import nothing but the standard library, torch, transformers and each other
(relatively: transformers' remote-code loader copies them into a package of its own).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mm1 import MM1HFConfig
from .connectors_mm1 import CONNECTORS, AttnPoolConnector, CAbstractor, build_connector_net


class MM1PreTrainedModel(PreTrainedModel):
    config: MM1HFConfig
    config_class = MM1HFConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    # device_map="auto" keeps each of these whole on one device; the vision tower's and the
    # language model's own layer classes are added by transformers from their models.
    _no_split_modules = [connector.__name__ for connector in CONNECTORS.values()]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, CAbstractor):  # raw parameters the generic init does not know
            nn.init.normal_(module.position_embedding, std=std)
        elif isinstance(module, AttnPoolConnector):
            nn.init.normal_(module.queries, std=std)


# The vision_config model types whose tower takes each image at its own patch grid.
NATIVE_RESOLUTION_TOWERS = ("siglip2_vision_model",)


def position_table_patches(vision_config) -> int:
    """Patches of the tower's position table, which the connector's table matches:
    SigLIP 2's ``num_patches`` (a ``g x g`` table), else ``(image_size / patch_size)^2``."""
    if vision_config.model_type in NATIVE_RESOLUTION_TOWERS:
        return vision_config.num_patches
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _grids_of(spatial_shapes: torch.Tensor, pixel_attention_mask: torch.Tensor) -> list:
    """``spatial_shapes`` as ``(rows, cols)`` ints, checked against the attention mask:
    image ``i``'s real patches are its first ``rows * cols`` rows."""
    grids = [(int(rows), int(cols)) for rows, cols in spatial_shapes.tolist()]
    real = pixel_attention_mask.sum(dim=-1).tolist()
    leading = [bool(row[: h * w].all()) for row, (h, w) in zip(pixel_attention_mask, grids)]
    counts_match = all(n == h * w for n, (h, w) in zip(real, grids))
    if len(real) != len(grids) or not (counts_match and all(leading)):
        raise ValueError(
            f"pixel_attention_mask marks {real} real patches but spatial_shapes {grids} "
            "need rows * cols each, first in every row; pass both as Siglip2ImageProcessor "
            "returns them"
        )
    return grids


class MM1ForConditionalGeneration(MM1PreTrainedModel, GenerationMixin):
    # As transformers marks a class loaded with trust_remote_code (see MM1HFConfig):
    # save_pretrained() then also writes this file and the two it imports.
    _auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: MM1HFConfig):
        super().__init__(config)
        vision, text = config.vision_config, config.text_config
        self.vision_tower = AutoModel.from_config(vision)
        self.connector = build_connector_net(
            config.connector_config,
            vision_hidden=vision.hidden_size,
            llm_hidden=text.hidden_size,
            num_patches=position_table_patches(vision),
            init_std=text.initializer_range,
        )
        self.language_model = AutoModelForCausalLM.from_config(text)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    @property
    def native_resolution(self) -> bool:
        """Whether the tower takes each image at its own patch grid (SigLIP 2 NaFlex)."""
        return self.config.vision_config.model_type in NATIVE_RESOLUTION_TOWERS

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[n, c, H, W]`` (or, native resolution, the padded patches with their mask and
        spatial shapes) -> ``[n, num_image_tokens, text_hidden]``."""
        if self.native_resolution:
            return self._native_image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        weight = self.vision_tower.embeddings.patch_embedding.weight
        size = self.config.vision_config.image_size
        # Tiles of another size (high-resolution fine-tuning) read the position table
        # resized bicubically to their patch grid, as training's ViT does.
        other_size = tuple(pixel_values.shape[-2:]) != (size, size)
        hidden = self.vision_tower(
            pixel_values=pixel_values.to(device=weight.device, dtype=weight.dtype),
            **({"interpolate_pos_encoding": True} if other_size else {}),
        ).last_hidden_state
        # CLIP's class token is not an image token; SigLIP has none.
        skip = 1 if self.config.vision_config.model_type == "clip_vision_model" else 0
        return self.connector(hidden[:, skip:])

    def _native_image_features(self, pixel_values, pixel_attention_mask, spatial_shapes):
        if pixel_attention_mask is None or spatial_shapes is None:
            raise ValueError(
                "this MM1 model's vision tower takes images at their native resolution "
                "(SigLIP 2 NaFlex): pass pixel_values with pixel_attention_mask and "
                "spatial_shapes, as its processor (Siglip2ImageProcessor) returns them"
            )
        grids = _grids_of(spatial_shapes, pixel_attention_mask)
        weight = self.vision_tower.embeddings.patch_embedding.weight
        hidden = self.vision_tower(
            pixel_values=pixel_values.to(device=weight.device, dtype=weight.dtype),
            pixel_attention_mask=pixel_attention_mask.to(weight.device),
            spatial_shapes=spatial_shapes.to(weight.device),
        ).last_hidden_state
        # The connector takes the images packed, each on its own grid. The padding rows
        # are dropped: the mask hid them as keys, so no real patch saw them.
        packed = torch.cat([hidden[index, : h * w] for index, (h, w) in enumerate(grids)])
        return self.connector.forward_grids(packed, grids)

    def _merge_images(
        self, input_ids, inputs_embeds, pixel_values, past_key_values, **native_inputs
    ):
        """``native_inputs``: a native-resolution tower's ``pixel_attention_mask`` and
        ``spatial_shapes`` (none for a fixed-resolution one)."""
        image_mask = input_ids == self.config.image_token_id
        num_slots = int(image_mask.sum())
        if num_slots == 0 and past_key_values is not None and past_key_values.get_seq_length() > 0:
            return inputs_embeds  # a decoding step: the images went in with the prompt
        features = self.get_image_features(pixel_values, **native_inputs)
        if num_slots != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids have {num_slots} image tokens but {features.shape[0]} "
                f"images give {features.shape[0] * features.shape[1]}; each image "
                f"needs {self.config.num_image_tokens} image tokens"
            )
        # With device_map="auto" the vision tower and the embeddings may sit on different
        # devices: the features move to the embeddings'.
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        features = features.reshape(-1, inputs_embeds.shape[-1])
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        num_tiles=None,
        pixel_attention_mask=None,
        spatial_shapes=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # num_tiles (from MM1Processor: tiles per image) is informative only: the tiles'
        # image tokens are already in input_ids, in order. pixel_attention_mask and
        # spatial_shapes come with a native-resolution tower's pixel_values.
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        # transformers 5 hands generate()'s cache over as ``cache``; older releases (and
        # callers) as ``past_key_values``. One cache, whichever name it came under.
        cache = kwargs.pop("cache", None)
        if past_key_values is None:
            past_key_values = cache
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                native_inputs = dict(
                    pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
                )
                native_inputs = {k: v for k, v in native_inputs.items() if v is not None}
                inputs_embeds = self._merge_images(
                    input_ids, inputs_embeds, pixel_values, past_key_values, **native_inputs
                )
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the image tokens)")
        cache_argument = (
            "cache"
            if "cache" in inspect.signature(self.language_model.forward).parameters
            else "past_key_values"
        )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_argument: past_key_values},
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
