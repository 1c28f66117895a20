"""``generate``: prompts in, generated token ids out, on every rank of the model.

One prefill encodes each prompt's images once and fills the KV cache; for beam search the
cache rows are then copied to the beams, and every step decodes one token per row (so
images, square or packed patches with their grids, are never duplicated). All
ranks of a pipeline take the same steps: the last stage decides the tokens and the
others receive them. With expert parallelism the data-parallel ranks (which hold
different prompts) must also step together, since every MoE layer exchanges tokens
across them: pass their group as ``lockstep_group``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from mm1_megatron.compat.inference import generation_mode
from mm1_megatron.inference.prompts import PROMPT_DOCUMENT, Prompt, left_pad
from mm1_megatron.inference.runner import CachedModelRunner
from mm1_megatron.inference.search import BeamSearch, GreedySearch
from mm1_megatron.parallel.collectives import all_gather_objects, all_reduce_values


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    num_beams: int = 1  # 1: greedy
    length_penalty: float = 0.0  # beam hypotheses score sum(log p) / length**this
    stop_token_ids: Tuple[int, ...] = ()  # end a row; not part of the output
    banned_token_ids: Tuple[int, ...] = ()  # never generated (image placeholder, padding)
    vocab_limit: Optional[int] = None  # ids from here on never generated (padded vocabulary)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")


def _search(config: GenerationConfig, num_prompts: int, pad_token_id: int):
    common = dict(
        stop_ids=config.stop_token_ids,
        banned_ids=config.banned_token_ids,
        pad_id=pad_token_id,
        vocab_limit=config.vocab_limit,
    )
    if config.num_beams == 1:
        return GreedySearch(num_prompts, **common)
    return BeamSearch(num_prompts, config.num_beams, length_penalty=config.length_penalty, **common)


def generate(
    model,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    *,
    pad_token_id: int,
    lockstep_group=None,
) -> List[List[int]]:
    """The generated ids per prompt (stop token excluded), on every rank of the model."""
    with torch.no_grad(), generation_mode():
        return _generate(model, prompts, config, pad_token_id, lockstep_group)


def _generate(model, prompts, config, pad_token_id, lockstep_group) -> List[List[int]]:
    if lockstep_group is not None:
        # Steps must pair up across the group: the same bound everywhere.
        low, high = (
            all_reduce_values([config.max_new_tokens], op=op, group=lockstep_group)[0]
            for op in ("min", "max")
        )
        if low != high:
            raise ValueError(
                f"ranks generating in lockstep need the same max_new_tokens; got {low:.0f} "
                f"to {high:.0f}"
            )
    batch = left_pad(prompts, pad_token_id=pad_token_id)
    search = _search(config, len(prompts), pad_token_id)
    prompt_length = batch.tokens.shape[1]
    total = prompt_length + config.max_new_tokens
    runner = CachedModelRunner(model, max_batch_size=search.rows, max_sequence_length=total)
    logits = runner.forward(batch.tokens, batch.document_ids, batch.images, batch.image_grids)
    rows = search.expansion()
    if search.rows != len(prompts):
        runner.reorder(rows)
    # On the model's device once: every decode step reads a prefix of it.
    documents = torch.full((search.rows, total), PROMPT_DOCUMENT, dtype=torch.long)
    documents[:, :prompt_length] = batch.document_ids[rows]
    documents = documents.to(runner.device)
    if logits is not None and search.rows != len(prompts):
        logits = logits[rows.to(logits.device)]
    for step in range(config.max_new_tokens):
        tokens, sources, done = _decide(runner, search, logits, config.num_beams > 1)
        if lockstep_group is not None:
            done = all_reduce_values([float(done)], op="min", group=lockstep_group)[0] > 0
        if done or step == config.max_new_tokens - 1:
            break
        if config.num_beams > 1:
            runner.reorder(sources)
        logits = runner.forward(tokens[:, None], documents)
    return _results_on_every_stage(search if runner.is_last else None, runner)


def _decide(runner: CachedModelRunner, search, logits, beams: bool):
    """``(tokens, source rows, done)`` as the last stage's search decides them, on every
    stage. Greedy search takes the argmax of the logits themselves, beam search their
    log-probabilities."""
    if runner.pp_size == 1:  # this process is the last stage
        scores = logits.cpu()
        return search.step(torch.log_softmax(scores, dim=-1) if beams else scores)
    decision = torch.zeros(2 * search.rows + 1, dtype=torch.long)
    if runner.is_last:
        scores = logits.cpu()
        tokens, sources, done = search.step(torch.log_softmax(scores, dim=-1) if beams else scores)
        decision = torch.cat([tokens, sources, torch.tensor([int(done)])])
    decision = runner.broadcast_from_last_stage(decision)
    return decision[: search.rows], decision[search.rows : -1], bool(decision[-1])


def _results_on_every_stage(search, runner: CachedModelRunner) -> List[List[int]]:
    results: Optional[List[List[int]]] = search.results() if search is not None else None
    if runner.pp_size == 1:
        return results
    gathered = all_gather_objects(results, group=parallel_state.get_pipeline_model_parallel_group())
    return gathered[-1]
