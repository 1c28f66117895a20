"""Micro-batches from any sequence builder: DP sharding, background workers, resumable state.

A *builder* has ``sequence(g) -> (PackedSequence, DataStats)``, a pure function of the
global sequence index ``g`` (``text_and_mixture.MixtureBuilder`` for shards and text,
``synthetic.sequences.SyntheticSequences`` for the synthetic world). Data-parallel rank ``r`` of
``D`` takes ``g = base + n D + r`` for its ``n``-th sequence, so ranks never share a
sequence and micro-batch ``k`` of rank ``r`` is a pure function of ``(seed, k, r)``.
Tensor- and pipeline-parallel ranks of one data-parallel rank build the same batches.

With balancing (``Balancing``) step ``s`` still consumes global sequences ``base + s G``
to ``base + (s + 1) G - 1`` (``G`` the global batch), but which rank and micro-batch slot
builds each one comes from ``balance.assign_global_batch``: every rank computes the
costs of the sequences it would have had (``builder.sequence_cost(g)``, no image is
decoded), the data-parallel ranks exchange them, and each rank builds its share of the
same assignment. The plan of a step is made when the first of its micro-batches is
requested (by the trainer, or by the prefetching ``DataLoader``), in the same order on
every rank, so the exchanges line up.

With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` builds micro-batches in
worker processes, ``prefetch_factor`` each ahead of the trainer, and returns them in
order. Bad samples never change how many sequences a rank produces, so no rank waits on
another; their counts travel with each micro-batch and add up in ``stats()``, and a
summary line of the skips since the last one is logged at most once a minute
(``skips.SkipSummary``).

State (``state_dict``): plain ints and strings, the same on every rank. Restoring it
continues with exactly the next micro-batch. Restoring it with another data-parallel size
continues the global sequence stream where it stopped (``base`` moves past everything
consumed), so no sequence is repeated or skipped, though which rank gets which sequence
differs from an uninterrupted run at the new size. With balancing every step's global batch
is the same at any data-parallel size, so a resume at another size continues with exactly
the global batches an uninterrupted run would have had (placed for the new size). A
balanced state saved inside a step continues only with the same placement (its consumed
sequences are spread over the whole global batch); the trainer saves at step boundaries.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from mm1_megatron.data.pipeline.balance import (
    ALGORITHM,
    NUM_COST_FIELDS,
    CostWeights,
    Exchange,
    assign_global_batch,
    integer_costs,
)
from mm1_megatron.data.pipeline.mixture import SOURCE_IDS
from mm1_megatron.data.pipeline.native_resolution import empty_grids
from mm1_megatron.data.pipeline.packing import PackedSequence
from mm1_megatron.data.pipeline.shared_memory import concat_images
from mm1_megatron.data.shards.skips import SKIP_REASONS, STAT_NAMES, DataStats, SkipSummary

logger = logging.getLogger(__name__)

BATCH_KEYS = (
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "document_ids",
    "images",
    "num_images",
    "source_ids",
    "num_real_tokens",
)
# Native resolution (model.vision.native_resolution) adds each image's patch grid.
NATIVE_BATCH_KEYS = (*BATCH_KEYS, "image_grids")
STATE_FORMAT = "mm1_megatron.data"
STATE_VERSION = 1
_STATS_KEY = "data_stats"


@dataclass(frozen=True)
class Balancing:
    """Balance the vision work of each global batch over ranks and micro-batches
    (``balance.py``). ``exchange`` all-gathers cost rows over the data-parallel group
    (``[n, F] -> [D, n, F]``); None in a single process."""

    num_microbatches: int
    weights: CostWeights
    exchange: Optional[Exchange] = None
    order: str = "spread"

    def state(self, micro_batch_size: int) -> Dict[str, object]:
        return {
            "algorithm": ALGORITHM,
            "order": self.order,
            "num_microbatches": self.num_microbatches,
            "micro_batch_size": micro_batch_size,
        }


class _MicroBatches(torch.utils.data.Dataset):
    """Item: a tuple of global sequence indices -> their micro-batch."""

    def __init__(self, builder):
        self.builder = builder

    def __getitem__(self, global_indices: Tuple[int, ...]) -> Dict[str, torch.Tensor]:
        stats = DataStats()
        sequences = []
        for index in global_indices:
            sequence, sequence_stats = self.builder.sequence(int(index))
            sequences.append(sequence)
            stats.merge(sequence_stats.as_list())
        batch = collate(sequences)
        batch[_STATS_KEY] = torch.tensor(stats.as_list(), dtype=torch.long)
        return batch


def natural_index(base: int, local_index: int, dp_rank: int, dp_size: int) -> int:
    """The global index of rank ``dp_rank``'s ``local_index``-th sequence counted from
    ``base``, placed without balancing: ``base + n D + r``."""
    return base + local_index * dp_size + dp_rank


class _Plan(torch.utils.data.Sampler):
    """This rank's micro-batches from a saved position on, as tuples of global indices.

    A snapshot of the loader's position, holding no reference to the loader: the
    prefetching ``DataLoader`` keeps its sampler, and a loader reachable from its own
    iterator would live (with its worker processes) until the cyclic garbage collector ran.
    """

    def __init__(
        self,
        builder,
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        base: int,
        first_sequence: int,
        balancing: Optional[Balancing],
    ):
        self.builder, self.micro_batch_size = builder, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.base, self.first_sequence, self.balancing = base, first_sequence, balancing

    def __iter__(self) -> Iterator[Tuple[int, ...]]:
        b, first = self.micro_batch_size, self.first_sequence
        if self.balancing is None:
            for start in itertools.count(first, b):
                yield tuple(
                    natural_index(self.base, start + j, self.dp_rank, self.dp_size)
                    for j in range(b)
                )
            return
        per_rank = self.balancing.num_microbatches * b
        step, within = divmod(first, per_rank)  # load_state_dict: within % b == 0
        global_batch = per_rank * self.dp_size
        while True:
            placed = self.plan_step(self.base + step * global_batch)
            yield from (tuple(int(g) for g in micro) for micro in placed[within // b :])
            step, within = step + 1, 0

    def plan_step(self, first_global: int) -> np.ndarray:
        """``[M, b]`` global indices of this rank's micro-batches in the step whose global
        batch starts at ``first_global`` (collective over the data-parallel group)."""
        balancing, b = self.balancing, self.micro_batch_size
        per_rank = balancing.num_microbatches * b
        own = [
            self.builder.sequence_cost(natural_index(first_global, n, self.dp_rank, self.dp_size))
            for n in range(per_rank)
        ]
        rows = np.array([cost.as_row() for cost in own], dtype=np.int64).reshape(
            per_rank, NUM_COST_FIELDS
        )
        gathered = rows[None] if balancing.exchange is None else balancing.exchange(rows)
        assert gathered.shape == (self.dp_size, per_rank, NUM_COST_FIELDS), gathered.shape
        # Offset n D + r of the global batch is rank r's n-th row.
        costs = gathered.transpose(1, 0, 2).reshape(-1, NUM_COST_FIELDS)
        placed = assign_global_batch(
            integer_costs(balancing.weights, costs),
            dp_size=self.dp_size,
            micro_batch_size=b,
            order=balancing.order,
        )
        return first_global + placed[self.dp_rank]


def _no_collate(batch):
    return batch


class MicroBatchLoader:
    """Endless iterator of micro-batch dicts (``BATCH_KEYS``, or ``NATIVE_BATCH_KEYS`` at
    native resolution; see ``collate``)."""

    def __init__(
        self,
        builder,
        *,
        tokenizer,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        fingerprint: str = "",
        multiprocessing_context: Optional[str] = None,
        balancing: Optional[Balancing] = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank} and {dp_size}")
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(
                f"need num_workers >= 0 and prefetch_factor >= 1, got "
                f"{num_workers} and {prefetch_factor}"
            )
        self.builder, self.tokenizer = builder, tokenizer
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.fingerprint = fingerprint
        self.multiprocessing_context = multiprocessing_context
        if balancing is not None and not hasattr(builder, "sequence_cost"):
            raise ValueError(f"{type(builder).__name__} cannot plan balanced batches")
        if balancing is not None and balancing.num_microbatches < 1:
            raise ValueError(f"num_microbatches={balancing.num_microbatches} must be >= 1")
        self.balancing = balancing
        self.base = 0
        self.num_sequences_consumed = 0
        self._stats = DataStats()
        self._skip_summary = SkipSummary()
        self._iterator: Optional[Iterator] = None

    # ---- iteration ----------------------------------------------------------------------
    def __iter__(self) -> MicroBatchLoader:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self._stats.merge(batch.pop(_STATS_KEY).tolist())
        self._skip_summary.update(self._stats.counts)
        self.num_sequences_consumed += self.micro_batch_size
        return batch

    def _start(self) -> Iterator:
        dataset = _MicroBatches(self.builder)
        plan = _Plan(
            self.builder,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            base=self.base,
            first_sequence=self.num_sequences_consumed,
            balancing=self.balancing,
        )
        if self.num_workers == 0:
            return (dataset[indices] for indices in plan)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=plan,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            collate_fn=_no_collate,
            multiprocessing_context=self.multiprocessing_context,
            # Page-locked batches make the trainer's non_blocking copies truly asynchronous.
            pin_memory=torch.cuda.is_available(),
        )
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._iterator = None

    def global_index(self, local_index: int) -> int:
        """Global index of this rank's ``local_index``-th sequence since ``base``."""
        return natural_index(self.base, local_index, self.dp_rank, self.dp_size)

    # ---- bad-sample counts --------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        """Counts over the micro-batches this loader returned (``skips.STAT_NAMES``)."""
        return dict(self._stats.counts)

    def skip_counts(self) -> Dict[str, int]:
        """Skipped samples per reason (``skips.SKIP_REASONS``) in the batches returned."""
        return {name: self._stats.counts[name] for name in SKIP_REASONS}

    # ---- resumable state ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.seed,
            "dp_size": self.dp_size,
            "base": self.base,
            "num_sequences_consumed": self.num_sequences_consumed,
            "fingerprint": self.fingerprint,
            "balance": None
            if self.balancing is None
            else self.balancing.state(self.micro_batch_size),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Continue after the last micro-batch the state was saved after (module docstring)."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a {STATE_FORMAT} v{STATE_VERSION} data loader state: "
                f"format={state.get('format')!r}, version={state.get('version')!r}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"data loader state was saved with seed={state['seed']} but this "
                f"run has training.seed={self.seed}; the data order would not "
                f"continue: resume with the same seed"
            )
        consumed, base = int(state["num_sequences_consumed"]), int(state["base"])
        if consumed < 0 or base < 0:
            raise ValueError(
                f"bad data loader state: base={base}, num_sequences_consumed={consumed}"
            )
        if state.get("fingerprint") != self.fingerprint:
            logger.warning(
                "the data configuration changed since this state was saved "
                "(shards, mixture, tokenizer or packing settings): batches will "
                "not match an uninterrupted run"
            )
        saved_dp = int(state["dp_size"])
        balance = None if self.balancing is None else self.balancing.state(self.micro_batch_size)
        same = saved_dp == self.dp_size and state.get("balance") == balance
        if same and balance is not None and consumed % self.micro_batch_size:
            raise ValueError(
                f"bad data loader state: {consumed} sequences consumed is not a whole number "
                f"of micro-batches of {self.micro_batch_size}"
            )
        if not same:
            _check_step_boundary(state, consumed)
        if same:
            self.base, self.num_sequences_consumed = base, consumed
        elif saved_dp == self.dp_size:
            # Another placement of the same global batches: continue at the first global
            # sequence not consumed.
            self.base, self.num_sequences_consumed = base + consumed * saved_dp, 0
            logger.info(
                "data balancing changed since the checkpoint (%s -> %s): continuing at "
                "global sequence %d with the new placement",
                state.get("balance"),
                balance,
                self.base,
            )
        else:
            self.base, self.num_sequences_consumed = base + consumed * saved_dp, 0
            logger.warning(
                "data-parallel size changed from %d to %d: continuing the data at "
                "global sequence %d (nothing repeated or skipped; %s)",
                saved_dp,
                self.dp_size,
                self.base,
                "with balancing, the same global batches as an uninterrupted run"
                if self.balancing is not None
                else "the split over ranks differs from an uninterrupted run",
            )
        self._iterator = None


def _check_step_boundary(state: Dict[str, object], consumed: int) -> None:
    """A balanced state saved part-way through a step has consumed sequences from all over
    that step's global batch, not a prefix of the stream: only the same placement (the
    same data-parallel size and balance settings) can continue it."""
    saved = state.get("balance")
    if not saved:
        return
    per_rank = int(saved["num_microbatches"]) * int(saved["micro_batch_size"])
    if consumed % per_rank:
        raise ValueError(
            f"this data loader state was saved {consumed % per_rank} sequences into a "
            f"balanced step (dp_size={state['dp_size']}, balance={saved}); it continues only "
            f"with the same data-parallel size and data.balance settings. Resume from a "
            f"checkpoint saved at a step boundary (the trainer saves only there) to change them"
        )


def stats_vector(loader) -> List[int]:
    """``STAT_NAMES``-ordered counts of ``loader`` (zeros for loaders without stats)."""
    counts = loader.stats() if hasattr(loader, "stats") else {}
    return [int(counts.get(name, 0)) for name in STAT_NAMES]


def collate(sequences: List[PackedSequence]) -> Dict[str, torch.Tensor]:
    """Stack packed sequences; images concatenate in order of appearance (row-major).

    Images keep the sequences' dtype (float32, or bfloat16 from a bf16 image pipeline). At
    native resolution ``images`` are the packed patches of all images and ``image_grids``
    their ``[n, 2]`` patch grids, in the same order (``batch/contract.py``).
    """

    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(seq, name) for seq in sequences])

    batch = {
        "tokens": stack("tokens"),
        "labels": stack("labels"),
        "loss_mask": stack("loss_mask"),
        "position_ids": stack("position_ids"),
        "document_ids": stack("document_ids"),
        "images": concat_images([seq.images for seq in sequences]),
        "num_images": torch.tensor([seq.num_images for seq in sequences], dtype=torch.long),
        "source_ids": torch.tensor([SOURCE_IDS[seq.source] for seq in sequences], dtype=torch.long),
        "num_real_tokens": torch.tensor(
            [seq.num_real_tokens for seq in sequences], dtype=torch.long
        ),
    }
    if any(seq.image_grids is not None for seq in sequences):
        batch["image_grids"] = _concat_grids(sequences)
    return batch


def _concat_grids(sequences: List[PackedSequence]) -> torch.Tensor:
    """Every image's grid; a sequence without grids (text) has no images."""
    grids = []
    for seq in sequences:
        assert seq.image_grids is not None or seq.num_images == 0, "images without grids"
        grids.append(seq.image_grids if seq.image_grids is not None else empty_grids())
    return torch.cat(grids)
