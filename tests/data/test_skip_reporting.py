"""Bad data is logged once per sample and process, then only counted and summarised; a
skipped sample is never read, tokenized or decoded again, and remembering verdicts never
changes the batches."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from mm1_megatron.config.schema import DataConfig, ImagePipelineConfig, ShardsConfig
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.loader import BATCH_KEYS
from mm1_megatron.data.shards import skips
from mm1_megatron.data.shards.reader import write_manifest
from mm1_megatron.data.shards.skips import BadSample, SkipSummary, SkipVerdicts
from tests.data.corpus_fixtures import good_caption_sample, write_bad_caption_corpus, write_tar

SKIPS_LOGGER = "mm1_megatron.data.shards.skips"
STEPS, WINDOW = 40, 4
SHORT = 128  # tokens: a window's pairs do not all fit, so what a failed one held matters


def _loader(manifest, *, window=WINDOW, seq_length=256, state=None):
    cfg = DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(manifest)]),
        mixture={"caption": 1},
        max_images_per_sequence=window,
        caption_window=window,
        images=ImagePipelineConfig(decoder="pil"),
    )
    loader, tokenizer = build_data(
        cfg,
        seq_length=seq_length,
        micro_batch_size=1,
        num_image_tokens=4,
        image_size=28,
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    if state is not None:
        loader.load_state_dict({**loader.state_dict(), **state})
    return loader, tokenizer


def _corpus_with(tmp_path, key: str, members: dict, num_samples: int = 24):
    """``num_samples`` caption pairs, one of which is ``key`` with ``members``."""
    rng = np.random.default_rng(0)
    samples = [(f"good{i:03d}", good_caption_sample(rng)) for i in range(num_samples - 1)]
    samples.insert(num_samples // 2, (key, members))
    write_tar(tmp_path / "c-0.tar", samples)
    entries = [{"path": "c-0.tar", "num_samples": num_samples}]
    return write_manifest(tmp_path / "manifest.json", "caption", entries)


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == SKIPS_LOGGER and r.levelno == level]


def test_a_broken_sample_is_logged_once_then_counted_and_summarised(tmp_path, caplog, monkeypatch):
    """The probe: one broken sample in 24, 40 steps (it was 107 identical warnings)."""
    image, _ = good_caption_sample(np.random.default_rng(1)).values()
    deep = b"[" * 100_000 + b"]" * 100_000  # a RecursionError for json.loads
    manifest = _corpus_with(tmp_path, "broken", {"jpg": image, "json": deep})
    monkeypatch.setattr(skips, "SKIP_SUMMARY_SECONDS", 0.0)  # a summary at every batch
    loader, _ = _loader(manifest)
    with caplog.at_level(logging.INFO, logger=SKIPS_LOGGER):
        for _ in range(STEPS):
            next(loader)
    skipped = loader.skip_counts()["bad_text"]
    assert skipped >= 5 and sum(loader.skip_counts().values()) == skipped  # drawn often
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "'broken'" in warnings[0] and "c-0.tar" in warnings[0] and "bad_text" in warnings[0]
    summaries = _messages(caplog, logging.INFO)
    counts = [
        re.match(r"skipped (\d+) samples since the last report: bad_text=\1", m) for m in summaries
    ]
    assert all(counts) and sum(int(m.group(1)) for m in counts) == skipped


def test_a_megabyte_caption_is_tokenized_once(tmp_path):
    image, _ = good_caption_sample(np.random.default_rng(1)).values()
    huge = ("red " * 250_000).encode()
    manifest = _corpus_with(tmp_path, "huge", {"jpg": image, "txt": huge})
    loader, tokenizer = _loader(manifest)
    lengths = []
    encode = tokenizer.encode

    def counting_encode(text):
        lengths.append(len(text))
        return encode(text)

    tokenizer.encode = counting_encode  # the instance every source holds
    for _ in range(STEPS):
        next(loader)
    assert loader.skip_counts()["too_long"] >= 3  # drawn again and again
    assert sum(length >= len(huge) - 1 for length in lengths) == 1


def test_remembered_verdicts_never_change_the_batches(tmp_path):
    """Batch k after k batches (verdicts remembered) equals batch k of a fresh loader:
    load and decode failures (corrupt images) replay exactly where they happened."""
    manifest, expected = write_bad_caption_corpus(tmp_path)
    assert expected["corrupt_image"] == 2
    loader, _ = _loader(manifest, window=5, seq_length=SHORT)
    num_batches = 12  # three epochs of the 20 samples: every bad one met several times
    batches = [next(loader) for _ in range(num_batches)]
    assert loader.skip_counts()["corrupt_image"] >= 4 and loader.stats()["unused_samples"] > 0
    for k in range(num_batches):
        fresh, _ = _loader(
            manifest, window=5, seq_length=SHORT, state={"num_sequences_consumed": k}
        )
        batch = next(fresh)
        for name in BATCH_KEYS:
            assert torch.equal(batch[name], batches[k][name]), (k, name)


def test_skip_summary_reports_only_new_skips_once_per_interval():
    now = [0.0]
    summary = SkipSummary(interval_s=60.0, clock=lambda: now[0])
    counts = dict.fromkeys(skips.SKIP_REASONS, 0)
    with pytest.MonkeyPatch.context() as patch:
        lines = []
        patch.setattr(skips.logger, "info", lambda message, *args: lines.append(message % args))
        counts["bad_text"] = 3
        summary.update(counts)  # too early
        now[0] = 61.0
        summary.update(counts)
        counts["too_long"] = 2
        now[0] = 62.0
        summary.update(counts)  # too early again
        now[0] = 122.0
        summary.update(counts)
        now[0] = 200.0
        summary.update(counts)  # nothing new: no line
    assert lines == [
        "skipped 3 samples since the last report: bad_text=3 (3 in all)",
        "skipped 2 samples since the last report: too_long=2 (5 in all)",
    ]


def test_skip_verdicts_are_bounded_and_per_stage():
    verdicts = SkipVerdicts(max_entries=2)
    error = BadSample("corrupt_image", "x")
    assert verdicts.remember(1, error, "decode") and not verdicts.remember(1, error, "decode")
    assert verdicts.recall(1, "load") is None and verdicts.recall(1, "decode").reason == (
        "corrupt_image"
    )
    verdicts.remember(2, BadSample("bad_text"), "load")
    assert len(verdicts) == 2
    assert verdicts.remember(3, BadSample("too_long"), "load")  # full: it starts over
    assert len(verdicts) == 1 and verdicts.recall(1, "decode") is None
    assert verdicts.recall(3, "load").reason == "too_long"


def test_long_details_are_shortened():
    error = BadSample("bad_record", "segment " + "[" * 10_000)
    assert len(str(error)) < 400 and str(error).endswith("characters)")


def test_parse_untrusted_turns_any_data_error_into_a_skip():
    def fail(error):
        raise error

    for error, reason in ((TypeError("x"), "bad_record"), (RecursionError(), "bad_record")):
        with pytest.raises(BadSample) as info:
            skips.parse_untrusted("record", fail, error)
        assert info.value.reason == reason and "record" in str(info.value)
    with pytest.raises(BadSample, match="bad_text: text: KeyError"):
        skips.parse_untrusted("text", fail, KeyError("k"), reason="bad_text")
    for passing in (OSError("disk"), MemoryError()):  # not the data's fault: not a skip
        with pytest.raises(type(passing)):
            skips.parse_untrusted("record", fail, passing)
