"""``build_data``: the data loader and tokenizer a training run asks for in ``data.*``.

    loader, tokenizer = build_data(cfg.data, seq_length=..., micro_batch_size=...,
                                   num_image_tokens=..., image_size=..., image_mean=...,
                                   image_std=..., seed=..., dp_rank=..., dp_size=...)

Both sources return a ``batches.MicroBatchLoader``: an endless iterator of micro-batch
dicts (``loader.collate``'s keys) with ``state_dict``/``load_state_dict``, ``stats`` and
``skip_counts``. ``data.source=synthetic`` serves the embedded generator (the same
sequences as ``SyntheticDataLoader``); ``data.source=webdataset`` serves caption and
interleaved shards and indexed text, mixed per sequence by ``mixture.MixtureSchedule``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, Sequence, Tuple

import torch

from mm1_megatron.config.schema import DataConfig
from mm1_megatron.data.batches import MicroBatchLoader
from mm1_megatron.data.images import build_image_decoder, check_image_options
from mm1_megatron.data.loader import SOURCE_IDS, SyntheticDataLoader
from mm1_megatron.data.mixture import MixtureSchedule
from mm1_megatron.data.packing import check_packing_arguments
from mm1_megatron.data.sources import (CaptionSource, InterleavedSource, MixtureBuilder,
                                       ShardCorpus, SyntheticBuilder, TextSource)
from mm1_megatron.data.tar_shards import load_manifest
from mm1_megatron.data.text_index import TextCorpus, check_text_meta
from mm1_megatron.data.text_tokenizers import build_tokenizer, tokenizer_fingerprint
from mm1_megatron.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def build_data(data_cfg: DataConfig, *, seq_length: int, micro_batch_size: int,
               num_image_tokens: int, image_size: int, image_mean: Sequence[float],
               image_std: Sequence[float], seed: int, dp_rank: int,
               dp_size: int) -> Tuple[MicroBatchLoader, Tokenizer]:
    """The loader for this data-parallel rank and the tokenizer it encodes with."""
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
    check_packing_arguments(seq_length, num_image_tokens, data_cfg.max_images_per_sequence,
                            image_mean, image_std)
    tokenizer = build_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_path)
    packing = dict(seq_length=seq_length, num_image_tokens=num_image_tokens,
                   image_size=image_size, image_mean=list(image_mean),
                   image_std=list(image_std))
    if data_cfg.source == "synthetic":
        synthetic = SyntheticDataLoader(data_cfg, micro_batch_size=micro_batch_size, seed=seed,
                                        dp_rank=dp_rank, dp_size=dp_size, tokenizer=tokenizer,
                                        **packing)
        builder, context = SyntheticBuilder(synthetic), None
    elif data_cfg.source == "webdataset":
        builder = _webdataset_builder(data_cfg, tokenizer, seed=seed, **packing)
        gpu_dali = data_cfg.image_decoder == "dali" and torch.cuda.is_available()
        context = "spawn" if gpu_dali else None  # CUDA does not survive a fork
    else:
        raise ValueError(f"data.source={data_cfg.source!r} is not one of synthetic, webdataset")
    fingerprint = _fingerprint(data_cfg, tokenizer, packing)
    loader = MicroBatchLoader(builder, tokenizer=tokenizer, micro_batch_size=micro_batch_size,
                              seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                              num_workers=data_cfg.num_workers,
                              prefetch_factor=data_cfg.prefetch_factor, fingerprint=fingerprint,
                              multiprocessing_context=context)
    logger.info("data: %s, tokenizer %s (%d tokens), dp rank %d/%d, %d workers",
                data_cfg.source, data_cfg.tokenizer, tokenizer.vocab_size, dp_rank, dp_size,
                data_cfg.num_workers)
    return loader, tokenizer


def _webdataset_builder(data_cfg: DataConfig, tokenizer: Tokenizer, *, seed: int,
                        seq_length: int, num_image_tokens: int, image_size: int,
                        image_mean: Sequence[float], image_std: Sequence[float]) -> MixtureBuilder:
    check_image_options(data_cfg.image_decoder, data_cfg.image_resize, data_cfg.image_dtype)
    decoder = build_image_decoder(data_cfg.image_decoder, image_size=image_size, mean=image_mean,
                                  std=image_std, resize_mode=data_cfg.image_resize,
                                  dtype=data_cfg.image_dtype)
    schedule = MixtureSchedule(data_cfg.mixture, seed)
    shard_options = dict(tokenizer=tokenizer, decoder=decoder, seq_length=seq_length,
                         num_image_tokens=num_image_tokens,
                         max_images=data_cfg.max_images_per_sequence, seed=seed)
    sources: Dict[str, object] = {}
    for name, cls, listed in (("caption", CaptionSource, data_cfg.caption_shards),
                              ("interleaved", InterleavedSource, data_cfg.interleaved_shards)):
        if schedule.probabilities[name] > 0:
            manifests = [load_manifest(path, kind=name) for path in listed]
            corpus = ShardCorpus(manifests, seed=seed, stream=SOURCE_IDS[name])
            sources[name] = cls(name, corpus, **shard_options)
            logger.info("%s: %d samples in %d shards", name, corpus.num_samples,
                        len(corpus.shard_paths))
    if schedule.probabilities["text"] > 0:
        for prefix in data_cfg.text_prefixes:
            check_text_meta(prefix, tokenizer)
        corpus = TextCorpus(data_cfg.text_prefixes, seq_length=seq_length, seed=seed)
        sources["text"] = TextSource(corpus, tokenizer=tokenizer, seq_length=seq_length,
                                     empty_images=decoder.empty())
        logger.info("text: %d documents, %d tokens per epoch", corpus.num_documents,
                    corpus.tokens_per_epoch)
    return MixtureBuilder(schedule, sources)


def _fingerprint(data_cfg: DataConfig, tokenizer: Tokenizer, packing: Dict) -> str:
    """Changes when anything that decides the batches changes (not num_workers)."""
    relevant = {key: value for key, value in vars(data_cfg).items()
                if key not in ("num_workers", "prefetch_factor")}
    payload = json.dumps({"data": relevant, "packing": packing,
                          "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
