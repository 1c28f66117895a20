"""Greedy search over next-token logits, beam search over their log-probabilities.

Both run on the last pipeline stage, which holds the logits; each step returns the token
every row feeds next and, for beam search, which cache row each new row continues. Rows
that finished feed the pad token and are ignored. Stop tokens (end of sequence, newline)
end a row and are not part of its output.

Beam search follows the usual formulation (Hugging Face's, which OpenFlamingo evaluates
with): every prompt keeps ``num_beams`` running beams; each step ranks the ``2 x
num_beams`` best continuations; a continuation with a stop token among the first
``num_beams`` becomes a finished hypothesis scored ``sum of log-probs / length **
length_penalty``; a prompt is done when it has ``num_beams`` hypotheses and no running beam
can beat the worst of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

NEG_INF = float("-inf")


def ban(logprobs: torch.Tensor, banned: Sequence[int], vocab_limit: Optional[int] = None):
    """``banned`` ids, and every id from ``vocab_limit`` on (the model's vocabulary is
    padded beyond the tokenizer's), can never be chosen."""
    if banned or (vocab_limit is not None and vocab_limit < logprobs.shape[-1]):
        logprobs = logprobs.clone()
        logprobs[:, list(banned)] = NEG_INF
        if vocab_limit is not None:
            logprobs[:, vocab_limit:] = NEG_INF
    return logprobs


class GreedySearch:
    def __init__(
        self,
        num_prompts: int,
        *,
        stop_ids: Sequence[int],
        banned_ids: Sequence[int],
        pad_id: int,
        vocab_limit: Optional[int] = None,
    ):
        self.stop_ids, self.banned_ids, self.pad_id = set(stop_ids), list(banned_ids), pad_id
        self.vocab_limit = vocab_limit
        self.outputs: List[List[int]] = [[] for _ in range(num_prompts)]
        self.finished = [False] * num_prompts
        self._sources = torch.arange(num_prompts)  # greedy rows never change places
        self._banned: Optional[torch.Tensor] = None  # [V] bool, built at the first step
        self._bans_any = False

    @property
    def rows(self) -> int:
        return len(self.outputs)

    def expansion(self) -> torch.Tensor:
        return torch.arange(self.rows)

    def _choose(self, logits: torch.Tensor) -> List[int]:
        """The argmax of the logits themselves, as transformers' greedy search takes it
        (that of the log-probabilities can differ where rounding makes two equal), over
        the ids that may be generated."""
        vocab = logits.shape[-1]
        if self._banned is None or self._banned.shape[0] != vocab:
            self._banned = ban(torch.zeros(1, vocab), self.banned_ids, self.vocab_limit)[0] < 0
            self._bans_any = bool(self._banned.any())
        if self._bans_any:
            logits = logits.masked_fill(self._banned, NEG_INF)
        return logits.argmax(dim=-1).tolist()

    def step(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``(next tokens [rows], cache rows to keep [rows], all done)``."""
        tokens = []
        for row, token in enumerate(self._choose(logits)):
            if self.finished[row]:
                tokens.append(self.pad_id)
            elif token in self.stop_ids:
                self.finished[row] = True
                tokens.append(self.pad_id)
            else:
                self.outputs[row].append(token)
                tokens.append(token)
        return torch.tensor(tokens), self._sources, all(self.finished)

    def results(self) -> List[List[int]]:
        return self.outputs


@dataclass
class _Hypotheses:
    """The finished hypotheses of one prompt, best first, at most ``size``."""

    size: int
    length_penalty: float
    items: List[Tuple[float, List[int]]]

    def add(self, tokens: List[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (max(len(tokens), 1) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) == self.size else NEG_INF

    def done(self, best_running_sum: float, generated: int) -> bool:
        if len(self.items) < self.size:
            return False
        best_possible = best_running_sum / (max(generated, 1) ** self.length_penalty)
        return self.worst() >= best_possible


class BeamSearch:
    def __init__(
        self,
        num_prompts: int,
        num_beams: int,
        *,
        stop_ids: Sequence[int],
        banned_ids: Sequence[int],
        pad_id: int,
        length_penalty: float = 0.0,
        vocab_limit: Optional[int] = None,
    ):
        self.num_prompts, self.num_beams = num_prompts, num_beams
        self.stop_ids, self.banned_ids, self.pad_id = set(stop_ids), list(banned_ids), pad_id
        self.vocab_limit = vocab_limit
        self.hypotheses = [_Hypotheses(num_beams, length_penalty, []) for _ in range(num_prompts)]
        self.done = [False] * num_prompts
        # Only the first beam of each prompt is live at the start: the first step then
        # picks num_beams different tokens after the same prompt.
        self.scores = torch.full((num_prompts, num_beams), NEG_INF, dtype=torch.float64)
        self.scores[:, 0] = 0.0
        self.beams: List[List[int]] = [[] for _ in range(num_prompts * num_beams)]

    @property
    def rows(self) -> int:
        return self.num_prompts * self.num_beams

    def expansion(self) -> torch.Tensor:
        """Cache rows after the prefill of one row per prompt: each prompt ``num_beams`` times."""
        return torch.arange(self.num_prompts).repeat_interleave(self.num_beams)

    def step(self, logprobs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Over next-token log-probabilities (the whole vocabulary's, before any ban)."""
        k = self.num_beams
        vocab = logprobs.shape[-1]
        candidates = ban(logprobs, self.banned_ids, self.vocab_limit).double()
        candidates = candidates + self.scores.reshape(-1, 1)
        top_scores, top_ids = candidates.reshape(self.num_prompts, k * vocab).topk(2 * k, dim=-1)
        tokens, source_rows = [], []
        new_scores = torch.full_like(self.scores, NEG_INF)
        new_beams: List[List[int]] = []
        generated = len(self.beams[0]) + 1
        for prompt in range(self.num_prompts):
            base = prompt * k
            if self.done[prompt]:
                tokens += [self.pad_id] * k
                source_rows += list(range(base, base + k))
                new_beams += [self.beams[base + j] for j in range(k)]
                continue
            kept = 0
            for rank, (score, flat) in enumerate(
                zip(top_scores[prompt].tolist(), top_ids[prompt].tolist())
            ):
                if score == NEG_INF:
                    break
                beam, token = divmod(flat, vocab)
                prefix = self.beams[base + beam]
                if token in self.stop_ids:
                    if rank < k:
                        self.hypotheses[prompt].add(list(prefix), score)
                    continue
                new_scores[prompt, kept] = score
                tokens.append(token)
                source_rows.append(base + beam)
                new_beams.append(prefix + [token])
                kept += 1
                if kept == k:
                    break
            for _ in range(k - kept):  # not enough live continuations: dead rows
                tokens.append(self.pad_id)
                source_rows.append(base)
                new_beams.append([])
            best_running = float(new_scores[prompt].max())
            self.done[prompt] = kept == 0 or self.hypotheses[prompt].done(best_running, generated)
        self.scores, self.beams = new_scores, new_beams
        return torch.tensor(tokens), torch.tensor(source_rows), all(self.done)

    def results(self) -> List[List[int]]:
        """The best hypothesis per prompt; running beams count as finished at the end."""
        best = []
        for prompt, hyps in enumerate(self.hypotheses):
            if not self.done[prompt]:
                for j in range(self.num_beams):
                    score = float(self.scores[prompt, j])
                    if score > NEG_INF:
                        hyps.add(list(self.beams[prompt * self.num_beams + j]), score)
            best.append(hyps.items[0][1] if hyps.items else [])
        return best
