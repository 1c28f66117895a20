"""What one context-parallel rank runs, holds and sends (``parallel.context_parallel_size``
= CP; docs/parallelism.md, "Context parallelism", describes the implementation).

- The decoder, the logits and the loss run on ``seq_length / CP`` tokens of each sequence
  (chunks ``r`` and ``2CP-1-r`` of every row). With one document per sequence (what the
  estimate assumes) the mirrored chunks give every rank exactly ``1/CP`` of the causal
  query-key pairs.
- Each decoder layer gathers every rank's keys and values into whole-sequence K and V
  (``[s, b, kv_groups / TP, head_dim]`` each), which attention keeps for its backward
  unless selective or full recomputation recomputes the core attention (gather included).
  Forward: an all-gather (a rank receives ``(CP-1)/CP`` of the whole K and V); backward:
  an all-reduce of their whole-sequence gradients.
- The first stage encodes only the images with a token in the rank's share. An image cut
  by a chunk boundary is encoded on both ranks, so the busiest rank encodes more than
  ``N / CP`` of a sequence's ``N`` images: ``tools/count_cp_work.py`` counts 0.594 /
  0.358 / 0.254 of them at CP = 2 / 4 / 8 (docs/parallelism.md). The estimate takes
  ``min(N, N / CP + 2)``, which covers those counts at MM1's 16 images (10 / 6 / 4 of 16
  against 9.5 / 5.7 / 4.1 counted) and the two chunk boundaries a rank's share has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.scaling.estimate.activations import Terms
from mm1_megatron.scaling.estimate.workload import Workload

CUT_IMAGES_PER_RANK = 2  # images a rank's two chunks can cut (one at each chunk's end)


@dataclass(frozen=True)
class CountedShare:
    """What a measured step's rank actually had, per sequence, in place of the estimate's
    worst case (``tools/check_estimate_memory.py`` counts them): the images it encoded
    and the padded query positions one layer's attention built."""

    images_per_sequence: float
    padded_positions_per_sequence: float


def busiest_rank_images(images_per_sequence: float, cp: int) -> float:
    """Images per sequence the busiest of ``cp`` ranks encodes (see the module docstring)."""
    if cp == 1:
        return images_per_sequence
    return min(images_per_sequence, images_per_sequence / cp + CUT_IMAGES_PER_RANK)


def rank_workload(cfg: MM1Config, w: Workload, counted: Optional[CountedShare] = None) -> Workload:
    """``w`` as one context-parallel rank runs it: ``seq_length / CP`` tokens, ``1/CP`` of
    the attention pairs and the busiest rank's images (``counted``'s when given). ``w``
    itself at CP = 1."""
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return w
    images = busiest_rank_images(w.images_per_sequence, cp)
    if counted is not None:
        images = counted.images_per_sequence
    return dataclasses.replace(
        w,
        seq_length=w.seq_length // cp,
        images_per_sequence=images,
        attention_pairs_per_sequence=w.attention_pairs_per_sequence // cp,
    )


def keeps_gathered_kv(cfg: MM1Config) -> bool:
    """Whether attention keeps the gathered whole-sequence K and V for backward."""
    par = cfg.parallel
    return par.context_parallel_size > 1 and par.recompute not in ("selective", "full")


def gathered_kv_values(cfg: MM1Config, local_seq_length: int, micro: int) -> float:
    """Values in one layer's whole-sequence K and V on one rank (``2 x [s, b, kv_groups /
    TP, head_dim]``), from a rank's ``local_seq_length = s / CP``."""
    llm, par = cfg.model.llm, cfg.parallel
    groups = llm.num_query_groups or llm.num_attention_heads
    seq = local_seq_length * par.context_parallel_size
    return 2 * seq * micro * groups / par.tensor_parallel_size * llm.attention_head_dim


def busiest_rank_padded_positions(local_seq_length: int, cp: int) -> float:
    """Query positions per sequence, placeholders included, of the runs one layer pads
    on the busiest rank (one document per sequence). A run of local queries that starts
    after the document's start is preceded by zero queries for the keys before it
    (``context_attention.context_parallel_attention``), so its padded length is the
    keys up to its end. Rank 0 pads the most: its last chunk, ``2CP x c`` keys
    (``c = s / 2CP``); its first chunk starts the document and is not padded."""
    chunk = local_seq_length / 2
    return 2 * cp * chunk


def gathered_attention_terms(
    cfg: MM1Config,
    layer: Terms,
    value_bytes: int,
    local_seq_length: int,
    micro: int,
    counted: Optional[CountedShare] = None,
    *,
    recomputing: bool = False,
) -> Terms:
    """A decoder layer's terms (``transformer_layer_terms`` on the rank's share) as the
    gather-then-attend path keeps them. Attention reads the gathered K and V, new tensors
    (``gathered_kv``), so nothing holds the fused QKV output or the rotated local keys any
    more: only the rotated queries remain. A run padded with placeholder queries keeps
    its padded queries, its whole output and their fp32 log-sum-exp (``padded_queries``;
    the busiest rank's with one document per sequence, or ``counted``'s). ``recomputing``:
    the layer full recomputation re-runs during backward, which keeps them like a layer
    without recomputation."""
    cp = cfg.parallel.context_parallel_size
    if not (keeps_gathered_kv(cfg) or (recomputing and cp > 1)):
        return layer
    out = dict(layer)
    if "rotated_qk" in out:  # else the queries are views of the fused QKV output
        llm = cfg.model.llm
        heads = llm.num_attention_heads
        out.pop("qkv")
        out["rotated_qk"] *= heads / (heads + (llm.num_query_groups or heads))
    out["gathered_kv"] = value_bytes * gathered_kv_values(cfg, local_seq_length, micro)
    positions = busiest_rank_padded_positions(local_seq_length, cp) * micro
    if counted is not None:
        positions = counted.padded_positions_per_sequence * micro
    llm = cfg.model.llm
    heads = llm.num_attention_heads / cfg.parallel.tensor_parallel_size
    per_position = heads * (2 * value_bytes * llm.attention_head_dim + 4)
    out["padded_queries"] = per_position * positions
    return out


def context_parallel_seconds(
    cfg: MM1Config, local_seq_length: int, num_layers: int, value_bytes: int, bandwidth: float
) -> float:
    """Seconds one micro-batch spends in ``num_layers`` layers' K/V collectives: the
    forward all-gather (again when recomputation re-runs the core attention) and the
    backward all-reduce of the whole-sequence gradients, each rank moving ``(CP-1)/CP``
    and ``2 (CP-1)/CP`` of the whole K and V bytes."""
    cp = cfg.parallel.context_parallel_size
    if cp == 1 or num_layers == 0:
        return 0.0
    whole = value_bytes * gathered_kv_values(cfg, local_seq_length, cfg.training.micro_batch_size)
    gathers = 1 if keeps_gathered_kv(cfg) else 2
    share = (cp - 1) / cp
    return num_layers * (gathers * share + 2 * share) * whole / bandwidth
