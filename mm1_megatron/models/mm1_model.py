"""``MM1Model``: image encoder -> connector -> Megatron-Core ``GPTModel``.

On a pipeline-parallel run the image encoder and connector live on the first stage
(``pre_process=True``), next to the token embedding; later stages hold only decoder
layers and receive hidden states through ``set_input_tensor``.

With ``model.vision.native_resolution`` the images arrive as packed patches
``[total_patches, c*p*p]`` with their host ``image_grids`` ``[n, 2]``
(``batch/contract.py``): the ViT encodes them as one packed sequence and the connector
still gives each image ``num_output_tokens`` tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.batch.context_parallel import local_image_tokens
from mm1_megatron.batch.contract import merge_image_embeddings
from mm1_megatron.batch.documents import document_layout
from mm1_megatron.batch.image_patches import grid_sizes_of, select_images
from mm1_megatron.config.schema import ModelConfig
from mm1_megatron.models.connectors import Connector
from mm1_megatron.models.context_attention import thd_packed_seq_params
from mm1_megatron.models.lora import add_adapters
from mm1_megatron.models.seeding import seeded
from mm1_megatron.models.specs import language_block_spec
from mm1_megatron.models.vision_encoder import VisionEncoder


class MM1Model(MegatronModule):
    def __init__(
        self,
        model: ModelConfig,
        *,
        language_config: TransformerConfig,
        vision_config: TransformerConfig,
        image_token_id: int,
        pre_process: bool = True,
        post_process: bool = True,
        init_seed: Optional[int] = None,
        adapter_seed: int = 0,
    ):
        super().__init__(config=language_config)
        self.image_token_id = image_token_id
        self.tokens_per_image = model.connector.num_output_tokens
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision_encoder: Optional[VisionEncoder] = None
        self.connector: Optional[Connector] = None
        # With init_seed, each part draws its weights from its own seeded stream, so the
        # weights do not depend on the pipeline split (see models/seeding.py).
        if pre_process:
            with seeded(init_seed, "vision_encoder"):
                self.vision_encoder = VisionEncoder(
                    vision_config, model.vision, transformer_impl=model.transformer_impl
                )
            grid = model.vision.image_size // model.vision.patch_size
            with seeded(init_seed, "connector"):
                self.connector = Connector(
                    vision_config,
                    model.connector,
                    vision_hidden=model.vision.hidden_size,
                    llm_hidden=model.llm.hidden_size,
                    num_patches=grid * grid,
                )
        with seeded(init_seed, "language_model"):
            self.language_model = self._build_language_model(model, language_config, init_seed)
        if model.lora.enabled:  # adapters drawn by layer name: any init device or layout
            add_adapters(self, model.lora, seed=adapter_seed)
        self._mark_experts_as_expert_parallel()

    def _mark_experts_as_expert_parallel(self) -> None:
        """Treat experts as expert-parallel even at EP=1 (Megatron-Core only does for EP>1).

        The optimizer then always has the same two parts (dense and expert), so an MoE
        checkpoint written at EP=2 loads at EP=1 and back. Numerically nothing changes:
        at EP=1 the expert data-parallel group is the data-parallel group.
        """
        for name, param in self.language_model.named_parameters():
            if ".experts." in name:
                param.allreduce = False

    def _build_language_model(
        self, model: ModelConfig, config: TransformerConfig, init_seed: Optional[int]
    ) -> GPTModel:
        return GPTModel(
            config=config,
            transformer_layer_spec=language_block_spec(
                config, model.transformer_impl, attention=model.attention, init_seed=init_seed
            ),
            vocab_size=model.llm.vocab_size,
            max_sequence_length=model.llm.max_sequence_length,
            pre_process=self.pre_process,
            post_process=self.post_process,
            share_embeddings_and_output_weights=model.llm.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.llm.rotary_base,
            rope_scaling=model.llm.rope_scaling_factor is not None,
            rope_scaling_factor=model.llm.rope_scaling_factor or 8.0,
            # Image tokens are merged into the full-length sequence before it is split
            # for sequence parallelism (``embed``), so the embedding returns it unsplit.
            scatter_embedding_sequence_parallel=False,
        )

    # Megatron's finalize_model_grads looks these up on the module that has pre_process,
    # to all-reduce tied embedding gradients between the first and last stage.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, images: torch.Tensor, image_grids=None) -> torch.Tensor:
        """``[n, c, H, W]`` -> connector tokens ``[n, num_output_tokens, llm_hidden]``; at
        native resolution packed patches ``[total_patches, c*p*p]`` and their host
        ``image_grids`` (``[n, 2]`` or ``(rows, cols)`` pairs) -> the same."""
        if not self.vision_encoder.native_resolution:
            if image_grids is not None:
                raise ValueError(
                    "image_grids come with native-resolution batches, but "
                    "model.vision.native_resolution=false: build the data with this config"
                )
            return self.connector(self.vision_encoder(images))
        if image_grids is None:
            raise ValueError(
                "model.vision.native_resolution=true takes packed patches with their "
                "image_grids (batch/contract.py), not fixed-size [n, c, H, W] images: pack "
                "each image with NativeResolution.pack (a Prompt: image_grids=...)"
            )
        grids = grid_sizes_of(image_grids)
        return self.connector(self.vision_encoder.encode_packed(images, grids), grids)

    def embed(
        self,
        tokens: torch.Tensor,
        images: Optional[torch.Tensor],
        image_grids=None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with image tokens merged in, ``[s, b, h]`` (split if SP).

        Under context parallelism (``document_ids`` registered with this rank's share by
        ``model_inputs``) only this rank's positions are embedded, and only the images
        with a token among them encoded (docs/parallelism.md measures the choice)."""
        shard = self._context_shard(document_ids, tokens.shape[1])
        if shard is not None:
            embeddings = self._embed_share(tokens, images, image_grids, shard.positions)
        else:
            embeddings = self._embed_rows(tokens, images, image_grids)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _embed_rows(self, tokens, images, image_grids) -> torch.Tensor:
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=None)
        if images is not None and images.shape[0] > 0:
            image_tokens = self.encode_images(images, image_grids)
            embeddings = merge_image_embeddings(
                embeddings, image_tokens, tokens, image_token_id=self.image_token_id
            )
        elif not tokens.is_cuda and bool((tokens == self.image_token_id).any()):
            # Not on GPU, where reading the result would stall every micro-batch; the
            # trainer checks its batches on the host instead.
            raise ValueError("tokens contain image placeholders but no images were given")
        elif self.training and torch.is_grad_enabled():
            embeddings = embeddings + self._zero_through_image_parts()
        return embeddings

    def _embed_share(self, tokens, images, image_grids, positions) -> torch.Tensor:
        """``[s / CP, b, h]``: this context-parallel rank's positions of each row, image
        tokens from encoding only the images that have one there."""
        share = tokens.index_select(1, positions.to(tokens.device))
        embeddings = self.language_model.embedding(input_ids=share, position_ids=None)
        needed = local_image_tokens(
            tokens,
            positions,
            image_token_id=self.image_token_id,
            tokens_per_image=self.tokens_per_image,
        )
        num_images = 0 if images is None else images.shape[0]
        if image_grids is not None:
            num_images = len(image_grids)
        if needed.slots.shape[0] == 0:
            if self.training and torch.is_grad_enabled():
                embeddings = embeddings + self._zero_through_image_parts()
            return embeddings
        if int(needed.images.max()) >= num_images:
            raise ValueError(
                f"tokens hold placeholders of {int(needed.images.max()) + 1}+ images but "
                f"{num_images} were given; each image needs exactly num_output_tokens "
                "placeholders"
            )
        picked, grids = select_images(images, image_grids, needed.images)
        image_tokens = self.encode_images(picked, grids)
        flat = image_tokens.reshape(-1, image_tokens.shape[-1])
        merged = embeddings.clone()
        merged[needed.slots[:, 1], needed.slots[:, 0]] = flat[needed.rows].to(merged.dtype)
        return merged

    def _context_shard(self, document_ids: Optional[torch.Tensor], seq_length: int):
        if self.config.context_parallel_size == 1:
            return None
        shard = None if document_ids is None else document_layout(document_ids).context
        if shard is None:
            raise ValueError(
                f"context_parallel_size={self.config.context_parallel_size} needs the "
                "micro-batch from mm1_megatron.batch.model_inputs (each rank's share of "
                "every row); generation does not run context-parallel"
            )
        assert shard.seq_length == seq_length, (shard, seq_length)
        return shard

    def _zero_through_image_parts(self) -> torch.Tensor:
        """0, computed from every trainable encoder and connector parameter.

        A text-only micro-batch skips the encoder; adding this keeps its parameters in the
        backward pass with exactly zero gradient, so Megatron-Core's overlapped gradient
        reduction sees every bucket complete (it asserts so) and nothing changes
        numerically. Reading the weights once costs far less than encoding an image.
        """
        params = [
            p
            for part in (self.vision_encoder, self.connector)
            for p in part.parameters()
            if p.requires_grad
        ]
        if not params:
            return torch.zeros(
                (), device=self.language_model.embedding.word_embeddings.weight.device
            )
        return sum(p.reshape(-1)[0] for p in params) * 0.0

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        document_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inference_context=None,
        image_grids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-token loss ``[b, s]`` when ``labels`` is given (last stage), else logits
        (last stage) or hidden states (other stages).

        With Megatron-Core's ``inference_context`` (generation with a KV cache) ``tokens``
        are the new positions only, while ``document_ids`` cover every cached position
        too, so attention knows which earlier keys each new token may see.

        ``image_grids`` (native resolution, on the host): each image's patch grid, with
        ``images`` its packed patches.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(tokens, images, image_grids, document_ids)
        packed = None
        if inference_context is None and self.config.context_parallel_size > 1:
            self._context_shard(document_ids, tokens.shape[1])  # checks the share
            layout = document_layout(document_ids)
            if layout.context.documents is not None:  # TE's THD context parallelism
                packed = thd_packed_seq_params(layout, tokens.device)
        return self.language_model(
            tokens,
            position_ids,
            document_ids,
            decoder_input=decoder_input,
            labels=labels,
            inference_context=inference_context,
            packed_seq_params=packed,
            # Generation takes whole-vocabulary logits (Megatron-Core requires it).
            runtime_gather_output=True if inference_context is not None else None,
        )
