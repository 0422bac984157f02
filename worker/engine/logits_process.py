"""Per-request changes to a step's logits before a token is picked: ``logit_bias``, the
repetition / frequency / presence penalties, and the grammar masks of structured outputs.

Each control is one vectorized pass over the rows that use it (per-row parameters as
tensors on the logits' device); a batch in which no request uses a control skips it without
touching the logits, so results without controls are unchanged bit for bit. The order is
vLLM's: grammar mask, logit bias, then penalties (repetition first, over prompt and output
tokens; frequency and presence over output tokens, as OpenAI defines them).
"""

from __future__ import annotations

import torch

from worker.engine.sequence import Sequence


def apply_controls(logits: torch.Tensor, seqs: list[Sequence],
                   masks: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` ``[len(seqs), vocab]`` with every control applied; the input tensor itself
    when no row uses one (never changed in place). ``masks``: bool ``[len(seqs), vocab]``,
    True where a grammar allows the token (None: no row has a grammar)."""
    bias_rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    penalty_rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if masks is None and not bias_rows and not penalty_rows:
        return logits
    logits = logits.clone()
    if masks is not None:
        logits.masked_fill_(~masks, float("-inf"))
    if bias_rows:
        _add_bias(logits, seqs, bias_rows)
    if penalty_rows:
        _penalize(logits, seqs, penalty_rows)
    return logits


def _add_bias(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    vocab = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for i in rows:
        for token, bias in seqs[i].params.logit_bias:
            if 0 <= int(token) < vocab:
                row_ids.append(i)
                token_ids.append(int(token))
                values.append(float(bias))
    if not row_ids:
        return
    dev = logits.device
    index = (torch.tensor(row_ids, device=dev, dtype=torch.long),
             torch.tensor(token_ids, device=dev, dtype=torch.long))
    logits.index_put_(index, torch.tensor(values, device=dev, dtype=logits.dtype),
                      accumulate=True)


def output_counts(seqs: list[Sequence], vocab: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """``[len(seqs), vocab]``: how often each token occurs in each sequence's output."""
    counts = torch.zeros(len(seqs), vocab + 1, device=device, dtype=dtype)
    longest = max((s.num_output_tokens for s in seqs), default=0)
    if longest:
        padded = [s.output_token_ids + [vocab] * (longest - s.num_output_tokens) for s in seqs]
        ids = torch.tensor(padded, device=device, dtype=torch.long).clamp_(0, vocab)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device, dtype=dtype))
    return counts[:, :vocab]


def prompt_mask(seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
    """bool ``[vocab]``: the tokens of the prompt; built once per sequence and kept."""
    mask = seq.prompt_mask
    if mask is None or mask.device != device or mask.shape[0] != vocab:
        mask = torch.zeros(vocab, device=device, dtype=torch.bool)
        ids = torch.tensor(seq.prompt_token_ids, device=device, dtype=torch.long)
        mask[ids.clamp(0, vocab - 1)] = True
        seq.prompt_mask = mask
    return mask


def _penalize(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    dev, vocab = logits.device, logits.shape[-1]
    sub = [seqs[i] for i in rows]
    index = torch.tensor(rows, device=dev, dtype=torch.long)
    x = logits.index_select(0, index)
    counts = output_counts(sub, vocab, dev, x.dtype)
    present = counts > 0
    if any(s.params.repetition_penalty != 1.0 for s in sub):
        seen = present | torch.stack([prompt_mask(s, vocab, dev) for s in sub])
        rep = torch.tensor([s.params.repetition_penalty for s in sub], device=dev,
                           dtype=x.dtype).unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([s.params.frequency_penalty for s in sub], device=dev, dtype=x.dtype)
    pres = torch.tensor([s.params.presence_penalty for s in sub], device=dev, dtype=x.dtype)
    x = x - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * present.to(x.dtype)
    logits.index_copy_(0, index, x)
