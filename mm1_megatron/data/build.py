"""``build_data``: the data loader and tokenizer a training run asks for in ``data.*``.

    loader, tokenizer = build_data(cfg.data, seq_length=..., micro_batch_size=...,
                                   num_image_tokens=..., image_size=..., image_mean=...,
                                   image_std=..., seed=..., dp_rank=..., dp_size=...,
                                   native=None)

Every source is a *builder* (``sequence(g)`` is a pure function of the global sequence
index) served by one ``pipeline.loader.MicroBatchLoader``, which owns data-parallel
sharding, prefetch workers and the saved position. ``data.source=synthetic`` builds from
the embedded synthetic world (``synthetic.sequences``); ``data.source=webdataset`` from
caption and interleaved shards and indexed text, mixed per sequence by
``pipeline.mixture.MixtureSchedule``. ``native`` (a ``NativeResolution``, from
``model.vision.native_resolution``) gives every image its own size and packs a
micro-batch's images as patches with their grids (``pipeline/native_resolution.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Dict, Optional, Sequence, Tuple

import torch

from mm1_megatron.config.schema import DataConfig, MM1Config
from mm1_megatron.data.pipeline.conversation_source import ConversationSource, PreferenceSource
from mm1_megatron.data.pipeline.images import build_image_decoder, check_image_options
from mm1_megatron.data.pipeline.loader import Balancing, MicroBatchLoader
from mm1_megatron.data.pipeline.mixture import SOURCE_IDS, MixtureSchedule
from mm1_megatron.data.pipeline.native_resolution import NativeResolution, native_resolution_of
from mm1_megatron.data.pipeline.packing import check_packing_arguments
from mm1_megatron.data.pipeline.sources import CaptionSource, InterleavedSource, ShardCorpus
from mm1_megatron.data.pipeline.text_and_mixture import MixtureBuilder, TextSource
from mm1_megatron.data.pipeline.tiling import tile_size
from mm1_megatron.data.shards.conversations import ChatTemplate
from mm1_megatron.data.shards.energon import load_source_manifest
from mm1_megatron.data.shards.text_index import TextCorpus, check_text_meta
from mm1_megatron.data.synthetic.sequences import SyntheticSequences
from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.data.tokenizers.text import build_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def build_data(
    data_cfg: DataConfig,
    *,
    seq_length: int,
    micro_batch_size: int,
    num_image_tokens: int,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    seed: int,
    dp_rank: int,
    dp_size: int,
    native: Optional[NativeResolution] = None,
    balancing: Optional[Balancing] = None,
) -> Tuple[MicroBatchLoader, Tokenizer]:
    """The loader for this data-parallel rank and the tokenizer it encodes with;
    ``balancing`` places each global batch's sequences by cost (``pipeline/balance.py``)."""
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
    check_packing_arguments(
        seq_length, num_image_tokens, data_cfg.max_images_per_sequence, image_mean, image_std
    )
    tokenizer = build_tokenizer(data_cfg.tokenizer.kind, data_cfg.tokenizer.path)
    packing = dict(
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        image_size=image_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
    if native is not None:  # absent otherwise: fingerprints of earlier runs stay valid
        packing["native"] = native
    context = None
    if data_cfg.source == "synthetic":
        builder = SyntheticSequences(
            data_cfg.mixture,
            seed=seed,
            tokenizer=tokenizer,
            max_images=data_cfg.max_images_per_sequence,
            tiling=data_cfg.tiling,
            conversations=data_cfg.conversations,
            video_frames=data_cfg.video.num_frames,
            **packing,
        )
    elif data_cfg.source == "webdataset":
        builder = _webdataset_builder(data_cfg, tokenizer, seed=seed, **packing)
        gpu_dali = data_cfg.images.decoder == "dali" and torch.cuda.is_available()
        context = "spawn" if gpu_dali else None  # CUDA does not survive a fork
    else:
        raise ValueError(f"data.source={data_cfg.source!r} is not one of synthetic, webdataset")
    num_workers = resolve_num_workers(data_cfg.num_workers, cuda=torch.cuda.is_available())
    loader = MicroBatchLoader(
        builder,
        tokenizer=tokenizer,
        micro_batch_size=micro_batch_size,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=num_workers,
        prefetch_factor=data_cfg.prefetch_factor,
        fingerprint=_fingerprint(data_cfg, tokenizer, packing),
        multiprocessing_context=context,
        balancing=balancing,
    )
    logger.info(
        "data: %s, tokenizer %s (%d tokens), dp rank %d/%d, %d workers, %s",
        data_cfg.source,
        data_cfg.tokenizer.kind,
        tokenizer.vocab_size,
        dp_rank,
        dp_size,
        num_workers,
        "balanced placement" if balancing is not None else "rank r takes every D-th sequence",
    )
    return loader, tokenizer


def resolve_num_workers(setting: Optional[int], *, cuda: bool) -> int:
    """``data.num_workers``; null means 2 background workers with CUDA (so the GPU never
    waits for the host to build a micro-batch) and 0 on CPU (workers would take the
    cores the model computes on)."""
    if setting is None:
        return 2 if cuda else 0
    return setting


def build_run_data(
    cfg: MM1Config,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    data: Optional[DataConfig] = None,
    seed: Optional[int] = None,
    balancing: Optional[Balancing] = None,
) -> Tuple[MicroBatchLoader, Tokenizer]:
    """``build_data`` with the packing a whole run's config implies (sequence length,
    micro-batch size, image tokens, the encoder's image size and normalisation, seed);
    ``data`` and ``seed`` replace the run's (held-out data)."""
    vision = cfg.model.vision
    return build_data(
        data if data is not None else cfg.data,
        seq_length=cfg.training.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        num_image_tokens=cfg.model.connector.num_output_tokens,
        # Tiles are what the encoder sees (its position tables are resized to fit them).
        image_size=tile_size(cfg.data.tiling) or vision.image_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
        seed=cfg.training.seed if seed is None else seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        native=native_resolution_of(vision),
        balancing=balancing,
    )


def _webdataset_builder(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seed: int,
    seq_length: int,
    num_image_tokens: int,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    native: Optional[NativeResolution] = None,
) -> MixtureBuilder:
    images = data_cfg.images
    check_image_options(images.decoder, images.resize, images.dtype)
    decoder = build_image_decoder(
        images.decoder,
        image_size=image_size,
        mean=image_mean,
        std=image_std,
        resize_mode=images.resize,
        dtype=images.dtype,
        dali_threads=images.dali_threads,
        native=native,
    )
    schedule = MixtureSchedule(data_cfg.mixture, seed)
    shard_options = dict(
        tokenizer=tokenizer,
        decoder=decoder,
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        max_images=data_cfg.max_images_per_sequence,
        seed=seed,
        tiling=data_cfg.tiling,
    )
    conversations = data_cfg.conversations
    conversation_options = dict(
        window=data_cfg.caption_window,
        template=ChatTemplate(**dataclasses.asdict(conversations.chat_template)),
        overlong=conversations.overlong,
        one_per_sequence=conversations.packing == "one_per_sequence",
    )
    extra_options = {
        "caption": dict(window=data_cfg.caption_window),
        "interleaved": {},
        "conversation": conversation_options,
        "preference": conversation_options,  # a pair is never cut: overlong is not read
    }
    classes = {
        "caption": CaptionSource,
        "interleaved": InterleavedSource,
        "conversation": ConversationSource,
        "preference": PreferenceSource,
    }
    sources: Dict[str, object] = {}
    for name, cls in classes.items():
        if schedule.probabilities[name] > 0:
            manifests = [
                load_source_manifest(path, name, allow_dataset_code=data_cfg.allow_dataset_code)
                for path in getattr(data_cfg.shards, name)
            ]
            corpus = ShardCorpus(manifests, seed=seed, stream=SOURCE_IDS[name])
            sources[name] = cls(name, corpus, **shard_options, **extra_options[name])
            logger.info(
                "%s: %d samples in %d shards", name, corpus.num_samples, len(corpus.shard_paths)
            )
    if schedule.probabilities["text"] > 0:
        for prefix in data_cfg.shards.text:
            check_text_meta(prefix, tokenizer)
        corpus = TextCorpus(data_cfg.shards.text, seq_length=seq_length, seed=seed)
        sources["text"] = TextSource(
            corpus,
            tokenizer=tokenizer,
            seq_length=seq_length,
            empty_images=decoder.empty(),
            empty_grids=None if native is None else native.empty()[1],
        )
        logger.info(
            "text: %d documents, %d tokens per epoch", corpus.num_documents, corpus.tokens_per_epoch
        )
    return MixtureBuilder(schedule, sources)


def _fingerprint(data_cfg: DataConfig, tokenizer: Tokenizer, packing: Dict) -> str:
    """Changes when anything that decides the batches changes (not how many workers or
    threads build them, nor the permission to run dataset code: without it, a dataset
    that needs it is refused; nor balancing, which places the same global batches)."""
    relevant = {
        key: value
        for key, value in dataclasses.asdict(data_cfg).items()
        if key not in ("num_workers", "prefetch_factor", "allow_dataset_code", "balance")
    }
    relevant["images"].pop("dali_threads")
    if not relevant["shards"]["preference"]:  # absent: fingerprints of earlier runs stay valid
        relevant["shards"].pop("preference")
    if not data_cfg.mixture.get("video", 0) > 0:  # the same for runs without videos
        relevant.pop("video")
    payload = json.dumps(
        {"data": relevant, "packing": packing, "tokenizer": tokenizer_fingerprint(tokenizer)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
