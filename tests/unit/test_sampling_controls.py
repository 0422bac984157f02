"""Sampling controls (penalties, logit_bias, min_p) and logprobs: the vectorized pass gives
what a per-row reference computes, leaves rows without controls bit for bit as they were,
and logprobs match a direct forward pass of the model."""

from __future__ import annotations

import math

import torch

from shared.protocol import GenerateRequest, SamplingParams, pack, unpack_request
from tests.unit.tiny_model import EOS, tiny_engine, tiny_llama
from worker.engine.logits_process import apply_controls
from worker.engine.sampler import Sampler
from worker.engine.sequence import Sequence
from worker.engine.types import EngineRequest

VOCAB = 64


def _seq(name: str, outputs: list[int] | None = None, **params: object) -> Sequence:
    seq = Sequence(name, [1, 5, 7, 5], SamplingParams(**params))  # type: ignore[arg-type]
    seq.output_token_ids = list(outputs or [])
    return seq


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen, device="cpu") * 3.0


def _reference(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row by the textbook definitions, token by token."""
    row = row.clone()
    p = seq.params
    for token, bias in p.logit_bias:
        row[int(token)] += bias
    seen = set(seq.prompt_token_ids) | set(seq.output_token_ids)
    for token in range(VOCAB):
        if token in seen and p.repetition_penalty != 1.0:
            value = row[token]
            row[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        count = seq.output_token_ids.count(token)
        row[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return row


def test_controls_match_a_per_row_reference_and_leave_other_rows_alone() -> None:
    seqs = [
        _seq("plain", [3, 3, 4]),
        _seq("freq", [3, 3, 4, 9], frequency_penalty=0.7),
        _seq("pres", [3, 3, 4], presence_penalty=1.5),
        _seq("rep", [8, 8], repetition_penalty=1.3),
        _seq("bias", [2], logit_bias=[[10, 5.0], [11, -100.0]]),
        _seq("all", [6, 6, 6, 7], frequency_penalty=-0.4, presence_penalty=0.2,
             repetition_penalty=0.8, logit_bias=[[6, 1.0]]),
    ]
    logits = _logits(len(seqs))
    got = apply_controls(logits, seqs)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(got[i], _reference(logits[i], seq), rtol=1e-6, atol=1e-5)
    assert torch.equal(got[0], logits[0])  # bit for bit


def test_without_controls_the_logits_are_not_even_copied() -> None:
    seqs = [_seq("a", [3]), _seq("b", [4], temperature=0.7, top_k=5)]
    logits = _logits(2)
    assert apply_controls(logits, seqs) is logits


def test_greedy_tokens_without_controls_are_unchanged_by_a_neighbour_using_them() -> None:
    model = tiny_llama(torch.float32)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = tiny_engine(model)
    alone.add_request(EngineRequest("p", [1, 4, 9, 16], plain))
    mixed = tiny_engine(model)
    mixed.add_request(EngineRequest("p", [1, 4, 9, 16], plain))
    mixed.add_request(EngineRequest("q", [1, 4, 9, 17], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, frequency_penalty=2.0,
        repetition_penalty=1.5, logit_bias=[[5, 3.0]])))

    def tokens(engine: object, rid: str) -> list[int]:
        out: list[int] = []
        while engine.has_unfinished():  # type: ignore[attr-defined]
            for o in engine.step():  # type: ignore[attr-defined]
                if o.id == rid:
                    out.extend(o.new_token_ids)
        return out

    assert tokens(mixed, "p") == tokens(alone, "p")


def test_logit_bias_forces_and_bans_tokens() -> None:
    sampler = Sampler([EOS])
    logits = _logits(3)
    banned = int(torch.argmax(logits[1]))
    seqs = [_seq("force", temperature=0.0, logit_bias=[[42, 100.0]]),
            _seq("ban", temperature=0.0, logit_bias=[[banned, -100.0]]),
            _seq("sampled", temperature=1.0, logit_bias=[[13, 100.0]])]
    tokens = sampler.sample(logits, seqs, [0.0, 0.0, 0.37])
    assert tokens[0] == 42 and tokens[1] != banned and tokens[2] == 13


def test_min_p_never_draws_a_token_below_its_floor() -> None:
    sampler = Sampler([EOS])
    logits = _logits(1, seed=3) / 3.0  # flat: most tokens are far below the top one
    probs = torch.softmax(logits[0], dim=-1)
    floor = 0.5 * float(probs.max())
    seq = _seq("m", temperature=1.0, min_p=0.5)
    drawn = {sampler.sample(logits, [seq], [u / 200])[0] for u in range(200)}
    assert drawn and all(float(probs[t]) >= floor for t in drawn)
    unfiltered = {sampler.sample(logits, [_seq("u", temperature=1.0)], [u / 200])[0]
                  for u in range(200)}
    assert len(unfiltered) > len(drawn)


def test_logprobs_equal_log_softmax_of_a_direct_forward_pass() -> None:
    model = tiny_llama(torch.float32)
    prompt = [1, 4, 9, 16, 25]
    engine = tiny_engine(model)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5,
                            presence_penalty=0.5, logit_bias=[[7, 2.0]])
    engine.add_request(EngineRequest("r", prompt, params))
    outs = []
    while engine.has_unfinished():
        outs.extend(o for o in engine.step() if o.id == "r")
    tokens = [t for o in outs for t in o.new_token_ids]
    entries = [e for o in outs for e in o.logprobs]
    assert len(entries) == len(tokens) == 4
    for step, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        ids = torch.tensor([prompt + tokens[:step]])
        with torch.no_grad():
            raw = model(ids).logits[0, -1].float()
        seq = Sequence("ref", prompt, params)
        seq.output_token_ids = tokens[:step]
        expected = torch.log_softmax(_reference_full(raw, seq), dim=-1)
        text, logprob, top = entry
        assert text == engine.decoder.decode([token])
        assert math.isclose(logprob, float(expected[token]), abs_tol=1e-4)
        values, ids_top = torch.topk(expected, 5)
        assert [engine.decoder.decode([i]) for i in ids_top.tolist()] == [t for t, _ in top]
        assert all(math.isclose(a, float(b), abs_tol=1e-4)
                   for (_, a), b in zip(top, values, strict=True))


def _reference_full(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    row = row.clone()
    for token, bias in seq.params.logit_bias:
        row[int(token)] += bias
    for token in set(seq.output_token_ids):
        row[token] -= seq.params.presence_penalty
    return row


def test_new_sampling_fields_survive_the_wire() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0,
                            repetition_penalty=1.2, logit_bias=[[3, -100], [9, 2.5]],
                            min_p=0.1, logprobs=3)
    back = unpack_request(pack(GenerateRequest("x", "m", [1, 2], params))).params
    assert back == params
