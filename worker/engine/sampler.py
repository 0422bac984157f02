"""Turns a step's logits into one token per sequence, each with its own sampling params.

Greedy rows take the argmax. All sampled rows of a step go through one vectorized pass on
the logits' device, with per-row temperature, top-k and top-p as tensors:

1. scale by temperature; the true probabilities are ``exp(scaled - logsumexp(scaled))``;
2. the ``K`` most likely tokens of every row (``K`` = the largest top-k, at least 256) give
   each row a threshold: its ``top_k``-th value, or the value where its nucleus (true
   probabilities, most likely first) reaches ``top_p``, whichever keeps fewer tokens. A
   top-p-only row whose nucleus is wider than ``K`` tokens is sorted over the whole
   vocabulary instead (rare; exact);
3. tokens at or above the threshold are kept (ties at the threshold are all kept) and one
   token is drawn per row by inverse CDF over the vocabulary in token-id order, with one
   uniform number from the sequence's own ``torch.Generator``.

The draw depends only on the row's own logits and its generator (never on the tie order of
a sort or on the other rows), so a seeded request gives the same tokens alone or in any
batch. Every tensor is created on the logits' device; the uniforms are drawn on the CPU
(the generators live there) and moved to the device once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.logits_process import apply_controls
from worker.engine.sequence import Sequence

_NUCLEUS_CANDIDATES = 256
_MIN_TEMPERATURE = 1e-5


@dataclass(slots=True)
class RowParams:
    """The sampled rows' parameters as tensors on the logits' device (one entry per row)."""

    temperature: torch.Tensor  # float32 [n]
    top_k: torch.Tensor  # int64 [n], 0 = off (clamped to the vocabulary)
    top_p: torch.Tensor  # float32 [n], 1.0 = off
    uniform: torch.Tensor  # float32 [n], in [0, 1)
    num_candidates: int  # K: the candidates every row's threshold is looked up among
    has_filter: bool  # some row uses top-k or top-p
    min_p: torch.Tensor | None = None  # float32 [n]; None: no row uses min-p


@dataclass(slots=True)
class TokenLogprobs:
    """The sampled token's log-probability and the ``k`` most likely tokens' (id, value)."""

    logprob: float
    top: list[tuple[int, float]]


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._default_generator = torch.Generator(device="cpu")
        self._default_generator.seed()

    def draw(self, seqs: list[Sequence]) -> list[float]:
        """One uniform number per sequence from its own generator (0.0 for greedy rows, which
        draw nothing). Drawn once per step, so a retry reuses them and a seed stays exact."""
        return [0.0 if s.params.is_greedy else self._uniform(s) for s in seqs]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               uniforms: list[float] | None = None,
               masks: torch.Tensor | None = None) -> list[int]:
        """``logits``: float32 ``[len(seqs), vocab]``; returns one token id per sequence.
        ``uniforms`` (from ``draw``) are drawn here when not given; ``masks``: the rows'
        grammar masks (bool ``[len(seqs), vocab]``, True = allowed), None when no row has
        one."""
        return self.sample_with_logprobs(logits, seqs, uniforms, masks)[0]

    def sample_with_logprobs(
        self, logits: torch.Tensor, seqs: list[Sequence], uniforms: list[float] | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """As ``sample``, with each row's log-probabilities when its request asks for them
        (``log_softmax`` of the logits after the grammar mask, bias and penalties, before
        temperature, top-k/top-p and min-p: vLLM's and OpenAI's values)."""
        if not seqs:
            return [], []
        if uniforms is None:
            uniforms = self.draw(seqs)
        logits = self._suppress_eos(logits, seqs)
        logits = apply_controls(logits, seqs, masks)
        tokens = self._pick(logits, seqs, uniforms)
        return tokens.tolist(), _logprobs(logits, seqs, tokens)

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence],
              uniforms: list[float]) -> torch.Tensor:
        tokens = torch.argmax(logits, dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device, dtype=torch.long)
            params = _row_params([seqs[i] for i in rows], [uniforms[i] for i in rows],
                                 logits.shape[-1], logits.device)
            tokens[index] = _sample_rows(logits.index_select(0, index), params)
        return tokens

    def _suppress_eos(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if rows and self.eos_token_ids:
            logits = logits.clone()
            eos = torch.tensor(self.eos_token_ids, device=logits.device, dtype=torch.long)
            index = torch.tensor(rows, device=logits.device, dtype=torch.long)
            logits[index.unsqueeze(1), eos] = float("-inf")
        return logits

    def _uniform(self, seq: Sequence) -> float:
        generator = seq.generator or self._default_generator
        return float(torch.rand(1, generator=generator, device="cpu").item())


def _row_params(seqs: list[Sequence], uniforms: list[float], vocab: int,
                device: torch.device) -> RowParams:
    temps = [max(s.params.temperature, _MIN_TEMPERATURE) for s in seqs]
    top_ks = [min(max(s.params.top_k, 0), vocab) for s in seqs]
    top_ps = [min(max(s.params.top_p, 0.0), 1.0) for s in seqs]
    has_filter = any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps)
    candidates = min(vocab, max([_NUCLEUS_CANDIDATES, *top_ks]))
    min_ps = [min(max(s.params.min_p, 0.0), 1.0) for s in seqs]
    return RowParams(
        temperature=torch.tensor(temps, device=device, dtype=torch.float32),
        top_k=torch.tensor(top_ks, device=device, dtype=torch.long),
        top_p=torch.tensor(top_ps, device=device, dtype=torch.float32),
        uniform=torch.tensor(uniforms, dtype=torch.float32, device="cpu").to(device),
        num_candidates=candidates, has_filter=has_filter,
        min_p=(torch.tensor(min_ps, device=device, dtype=torch.float32)
               if any(min_ps) else None),
    )


def _logprobs(logits: torch.Tensor, seqs: list[Sequence],
              tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    """One pass over the rows that ask for log-probabilities; None for the others."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device, dtype=torch.long)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    k = min(max(seqs[i].params.logprobs or 0 for i in rows), logp.shape[-1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k:
        values, ids = torch.topk(logp, k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        want = seqs[i].params.logprobs or 0
        top = list(zip(top_ids[j][:want], top_values[j][:want], strict=True))
        out[i] = TokenLogprobs(chosen[j], top)
    return out


def _sample_rows(logits: torch.Tensor, p: RowParams) -> torch.Tensor:
    """One token per row of ``logits`` ``[n, vocab]``; every row is sampled (not greedy)."""
    scaled = logits.float() / p.temperature.unsqueeze(1)
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    probs = torch.exp(scaled - log_norm)
    if p.has_filter:
        threshold = _thresholds(scaled, log_norm, p)
        probs = probs.masked_fill(scaled < threshold.unsqueeze(1), 0.0)
    if p.min_p is not None:  # relative to the most likely token (kept by any filter)
        floor = p.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return _inverse_cdf(probs, p.uniform)


def _thresholds(scaled: torch.Tensor, log_norm: torch.Tensor, p: RowParams) -> torch.Tensor:
    """Per row, the smallest scaled logit that top-k and top-p both keep (-inf: keep all)."""
    values, _ = torch.topk(scaled, p.num_candidates, dim=-1)
    threshold = _threshold_among(values, log_norm, p)
    if p.num_candidates < scaled.shape[-1]:
        covered = torch.exp(values - log_norm).sum(dim=-1)
        wide = (p.top_k == 0) & (p.top_p < 1.0) & (covered < p.top_p)
        if bool(wide.any()):  # a nucleus wider than K: those rows sort the whole vocabulary
            rows = torch.nonzero(wide).squeeze(1)
            full, _ = torch.sort(scaled.index_select(0, rows), dim=-1, descending=True)
            sub = RowParams(p.temperature[rows], p.top_k[rows], p.top_p[rows], p.uniform[rows],
                            scaled.shape[-1], True, None)
            threshold = threshold.index_copy(0, rows, _threshold_among(full, log_norm[rows], sub))
    return threshold


def _threshold_among(values: torch.Tensor, log_norm: torch.Tensor, p: RowParams,
                     ) -> torch.Tensor:
    """``values``: each row's leading scaled logits, most likely first ``[n, K]``."""
    k = values.shape[-1]
    cumulative = torch.cumsum(torch.exp(values - log_norm), dim=-1)
    nucleus = torch.searchsorted(cumulative, p.top_p.unsqueeze(1)).squeeze(1) + 1
    nucleus = torch.where(p.top_p < 1.0, nucleus, torch.full_like(nucleus, k))
    by_k = torch.where(p.top_k > 0, p.top_k, torch.full_like(p.top_k, k))
    keep = torch.minimum(torch.minimum(nucleus, by_k), torch.full_like(by_k, k))
    threshold = values.gather(1, (keep - 1).unsqueeze(1)).squeeze(1)
    off = (p.top_k == 0) & (p.top_p >= 1.0)
    return threshold.masked_fill(off, float("-inf"))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability passes ``u x total``."""
    cumulative = torch.cumsum(probs, dim=-1)
    target = (uniform * cumulative[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    last_kept = torch.argmax(cumulative, dim=-1)  # the first index reaching the total
    return torch.minimum(index, last_kept)
