"""Preference tuning (DPO, Rafailov et al., 2023) as a loss on packed preference pairs.

A preference sequence packs whole pairs, each answer its own document: document ``2k`` is
pair ``k``'s chosen conversation, ``2k + 1`` its rejected one (the same images and prompt),
the loss mask on the answer's tokens only (``data/pipeline/preferences.py``). So the log
probability of each answer is a sum over its document, and a pair never crosses
micro-batches.

With ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` and ``d = r(chosen) - r(rejected)``:

- ``sigmoid`` (the paper's): ``-(1 - eps) log sigmoid(d) - eps log sigmoid(-d)``, with
  ``eps = label_smoothing`` (0: DPO itself; > 0: conservative DPO for noisy labels);
- ``ipo`` (Azar et al., 2023): ``(d / beta - 1 / (2 beta))^2``, which keeps the margin
  finite where the sigmoid loss drives it to infinity on pairs it already separates.

``nll_weight`` adds that times the chosen answer's mean token NLL (RPO, Pang et al., 2024):
DPO alone can widen the margin by lowering both answers' likelihood (measured here on the
debug model: the chosen answers' log probability fell from -14.9 to -21.5 in 200 steps).

The reference log probabilities come from a forward-only pass of the frozen reference
(the starting weights) over the same micro-batches just before the step
(``reference_logps``), attached to each micro-batch as ``reference_logps``.

The loss function follows the trainer's contract (``step.py``): it returns the sum over
the micro-batch's pairs and the number of pairs, and Megatron-Core divides by the global
pair count, so accumulation and data parallelism give the mean over the step's pairs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mm1_megatron.config.schema import PreferenceConfig

Batch = Dict[str, torch.Tensor]


def document_logps(per_token_loss: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[b, s]``: entry ``[i, d]`` is the summed log probability of row ``i``'s document
    ``d`` over its loss-masked tokens (the answer's), 0 where there is none."""
    logp = -(per_token_loss.float() * batch["loss_mask"].float())
    return torch.zeros_like(logp).scatter_add_(1, batch["document_ids"], logp)


def _answer_counts(batch: Batch) -> torch.Tensor:
    mask = batch["loss_mask"].float()
    return torch.zeros_like(mask).scatter_add_(1, batch["document_ids"], mask)


def _pairs_of(values: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = values[:, 0::2], values[:, 1::2]
    width = min(chosen.shape[1], rejected.shape[1])
    real = (counts[:, 0::2][:, :width] > 0) & (counts[:, 1::2][:, :width] > 0)
    return chosen[:, :width][real], rejected[:, :width][real]


def pair_logps(
    logps: torch.Tensor, batch: Batch, counts: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` log probabilities ``[num_pairs]`` of the micro-batch's pairs
    (document pairs ``2k, 2k + 1`` whose answers both have tokens), row by row;
    ``counts``: the batch's answer token counts per document, where already known."""
    return _pairs_of(logps, _answer_counts(batch) if counts is None else counts)


def preference_loss(
    policy: Tuple[torch.Tensor, torch.Tensor],
    reference: Tuple[torch.Tensor, torch.Tensor],
    settings: PreferenceConfig,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per pair: ``(loss, reward margin d)`` from ``(chosen, rejected)`` log
    probabilities under the policy and the reference."""
    beta = settings.beta
    chosen_reward = beta * (policy[0] - reference[0])
    rejected_reward = beta * (policy[1] - reference[1])
    margin = chosen_reward - rejected_reward
    if settings.loss == "ipo":
        loss = (margin / beta - 1 / (2 * beta)) ** 2
    else:
        eps = settings.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    return loss, margin


def reference_logps(batch: Batch, per_token_loss: torch.Tensor, non_loss_data: bool = True):
    """The reference pass's loss function (Megatron-Core's ``collect_non_loss_data``): the
    micro-batch's document log probabilities, kept for the training step."""
    assert non_loss_data, "the reference pass runs forward-only"
    return document_logps(per_token_loss, batch).detach()


def preference_loss_and_report(
    batch: Batch, per_token_loss: torch.Tensor, *, settings: PreferenceConfig
):
    """``(loss summed over pairs, number of pairs, report)`` for one micro-batch."""
    counts = _answer_counts(batch)  # per document, once for every pairing below
    policy = pair_logps(document_logps(per_token_loss, batch), batch, counts)
    reference = pair_logps(batch["reference_logps"].float(), batch, counts)
    losses, margins = preference_loss(policy, reference, settings)
    if settings.nll_weight > 0:  # RPO: the chosen answer's mean token NLL as well
        chosen_lengths = _pairs_of(counts, counts)[0]
        losses = losses - settings.nll_weight * policy[0] / chosen_lengths
    num_pairs = torch.tensor(float(losses.numel()), device=losses.device)
    loss_sum = losses.sum()
    beta = settings.beta
    detached = {
        "loss": loss_sum.detach(),
        "dpo/reward_margin": margins.detach().sum(),
        "dpo/reward_accuracy": (margins.detach() > 0).float().sum(),
        "dpo/chosen_reward": (beta * (policy[0] - reference[0])).detach().sum(),
        "dpo/rejected_reward": (beta * (policy[1] - reference[1])).detach().sum(),
        "dpo/chosen_logp": policy[0].detach().sum(),
    }
    report = {name: torch.stack([value, num_pairs]) for name, value in detached.items()}
    return loss_sum, num_pairs.int(), report
