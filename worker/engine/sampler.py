"""Turns a step's logits into one token per sequence, each with its own sampling params.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw
with the sequence's own ``torch.Generator`` (one uniform number per step), so a seeded
request gives the same tokens alone or in any batch. Top-p looks at the 256 most likely
tokens first and only sorts the whole vocabulary for a row whose nucleus is wider: exact,
and cheap in the common case.
"""

from __future__ import annotations

import torch

from worker.engine.sequence import Sequence

_NUCLEUS_CANDIDATES = 256


class Sampler:
    def __init__(self, eos_token_ids: list[int], device: torch.device) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self._default_generator = torch.Generator(device="cpu")
        self._default_generator.seed()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """``logits``: float32 ``[len(seqs), vocab]``; returns one token id per sequence."""
        if not seqs:
            return []
        logits = self._suppress_eos(logits, seqs)
        tokens = torch.argmax(logits, dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if not seq.params.is_greedy:
                tokens[i] = self._sample_row(logits[i], seq)
        return tokens

    def _suppress_eos(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if rows and self.eos_token_ids:
            logits = logits.clone()
            eos = torch.tensor(self.eos_token_ids, device=logits.device)
            logits[torch.tensor(rows, device=logits.device).unsqueeze(1), eos] = float("-inf")
        return logits

    def _uniform(self, seq: Sequence) -> float:
        generator = seq.generator or self._default_generator
        return float(torch.rand(1, generator=generator).item())

    def _sample_row(self, row: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        scaled = row / max(p.temperature, 1e-5)
        if p.top_k > 0 or p.top_p < 1.0:
            return self._sample_filtered(scaled, p.top_k, p.top_p, self._uniform(seq))
        probs = torch.softmax(scaled, dim=-1)
        return _inverse_cdf(probs, self._uniform(seq))

    def _sample_filtered(self, scaled: torch.Tensor, top_k: int, top_p: float, u: float) -> int:
        vocab = scaled.shape[-1]
        k = min(vocab, top_k) if top_k > 0 else min(vocab, _NUCLEUS_CANDIDATES)
        values, indices = torch.topk(scaled, k)
        log_norm = torch.logsumexp(scaled, dim=-1)
        probs = torch.exp(values - log_norm)  # true probabilities of the candidates
        if top_p < 1.0:
            covered = float(probs.sum())
            if top_k <= 0 and covered < top_p and k < vocab:  # nucleus wider: sort it all
                values, indices = torch.sort(scaled, descending=True)
                probs = torch.exp(values - log_norm)
            cumulative = torch.cumsum(probs, dim=-1)
            keep = int(torch.searchsorted(cumulative, torch.tensor([top_p])).item()) + 1
            probs, indices = probs[:keep], indices[:keep]
        return int(indices[_inverse_cdf(probs / probs.sum(), u)].item())


def _inverse_cdf(probs: torch.Tensor, u: float) -> int:
    cumulative = torch.cumsum(probs, dim=-1)
    index = int(torch.searchsorted(cumulative, torch.tensor([u * float(cumulative[-1])])).item())
    return min(index, probs.shape[-1] - 1)
