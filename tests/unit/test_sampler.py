"""The sampler: device placement, one vectorized pass that gives every row the answer it
would get alone, the distribution it draws from, and a sampling failure that fails only its
own request."""

from __future__ import annotations

import collections

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.sampler import Sampler, TokenLogprobs
from worker.engine.sequence import Sequence
from worker.engine.types import EngineRequest, RequestOutput

EOS = 2


def _seq(name: str, **params: object) -> Sequence:
    return Sequence(name, [1, 5, 7], SamplingParams(**params))  # type: ignore[arg-type]


def _logits(rows: int, vocab: int = 512, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen, device="cpu") * scale


MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.3),
    dict(temperature=0.8, top_k=300, top_p=0.5),
    dict(temperature=1.0, top_p=0.999),  # nucleus wider than the 256 candidates
    dict(temperature=0.0, min_tokens=5),
    dict(temperature=1.0, min_tokens=5, top_k=3),
]


def test_no_tensor_is_created_without_an_explicit_device() -> None:
    """Under a ``meta`` default device, any tensor built without ``device=`` lands on meta
    and cannot mix with the CPU logits: the sampler must still give the CPU answer."""
    seqs = [_seq(f"s{i}", **p) for i, p in enumerate(MIXED)]
    logits = _logits(len(seqs))
    uniforms = [0.1 * i + 0.05 for i in range(len(seqs))]
    sampler = Sampler([EOS])
    expected = sampler.sample(logits, seqs, uniforms)
    seeded = _seq("seeded", temperature=1.0, seed=3)
    seeded.generator = torch.Generator(device="cpu").manual_seed(3)
    expected_draw = sampler.draw([seeded])
    seeded.generator.manual_seed(3)
    with torch.device("meta"):
        got = sampler.sample(logits, seqs, uniforms)
        got_draw = sampler.draw([seeded])
        unseeded = sampler.sample(logits, seqs)  # draws from the default generator
    assert got == expected and got_draw == expected_draw
    assert len(unseeded) == len(seqs)


def test_an_engine_step_builds_every_tensor_on_the_model_device() -> None:
    model = tiny_llama(torch.float32)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.0, top_k=5, seed=8, min_tokens=3)]

    def run(meta: bool) -> dict[str, list[int]]:
        engine = tiny_engine(model)
        for i, p in enumerate(params):
            engine.add_request(EngineRequest(f"r{i}", [1, 9 + i, 14, 30], p))
        with torch.device("meta") if meta else torch.device("cpu"):
            return _drain(engine)

    assert run(meta=True) == run(meta=False)


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    got: dict[str, list[int]] = collections.defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            got[out.id].extend(out.new_token_ids)
    return dict(got)


def test_each_row_gets_the_same_token_alone_and_in_any_batch() -> None:
    logits = _logits(len(MIXED), seed=1)
    seqs = [_seq(f"s{i}", **p) for i, p in enumerate(MIXED)]
    sampler = Sampler([EOS])
    for trial in range(20):
        uniforms = [((trial * 7 + i * 13) % 97) / 97 for i in range(len(seqs))]
        batched = sampler.sample(logits, seqs, uniforms)
        alone = [sampler.sample(logits[i:i + 1], [s], [uniforms[i]])[0]
                 for i, s in enumerate(seqs)]
        assert batched == alone
        order = list(reversed(range(len(seqs))))  # another batch composition and order
        shuffled = sampler.sample(logits[order], [seqs[i] for i in order],
                                  [uniforms[i] for i in order])
        assert shuffled == [batched[i] for i in order]


def test_greedy_rows_are_the_argmax_bit_for_bit() -> None:
    logits = _logits(len(MIXED), seed=2)
    seqs = [_seq(f"s{i}", **p) for i, p in enumerate(MIXED)]
    tokens = Sampler([EOS]).sample(logits, seqs, [0.5] * len(seqs))
    assert tokens[0] == int(torch.argmax(logits[0]))
    masked = logits[6].clone()
    masked[EOS] = float("-inf")
    assert tokens[6] == int(torch.argmax(masked))


def test_min_tokens_never_samples_eos() -> None:
    logits = torch.zeros(64, 8, device="cpu")
    logits[:, EOS] = 10.0  # EOS would win almost always
    seqs = [_seq(f"s{i}", temperature=1.0, min_tokens=2) for i in range(64)]
    tokens = Sampler([EOS]).sample(logits, seqs, [i / 64 for i in range(64)])
    assert EOS not in tokens


def test_top_k_one_and_a_tiny_top_p_are_greedy() -> None:
    logits = _logits(16, seed=3)
    greedy = torch.argmax(logits, dim=-1).tolist()
    sampler = Sampler([EOS])
    uniforms = [i / 16 for i in range(16)]
    top_k = [_seq(f"k{i}", temperature=0.9, top_k=1) for i in range(16)]
    top_p = [_seq(f"p{i}", temperature=0.9, top_p=1e-6) for i in range(16)]
    assert sampler.sample(logits, top_k, uniforms) == greedy
    assert sampler.sample(logits, top_p, uniforms) == greedy


def _frequencies(probs: torch.Tensor, n: int, **params: object) -> torch.Tensor:
    """Draw ``n`` tokens from one distribution (``n`` identical rows, uniforms spread over
    [0, 1)); returns the fraction of draws per token."""
    logits = torch.log(probs).unsqueeze(0).expand(n, -1).contiguous()
    seqs = [_seq(f"s{i}", **params) for i in range(n)]
    uniforms = [(i + 0.5) / n for i in range(n)]
    tokens = Sampler([]).sample(logits, seqs, uniforms)
    return torch.bincount(torch.tensor(tokens, device="cpu"), minlength=probs.numel()) / n


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], device="cpu")


def test_plain_temperature_one_draws_from_the_softmax() -> None:
    freq = _frequencies(PROBS, 2000, temperature=1.0)
    assert torch.allclose(freq, PROBS, atol=2e-3)


def test_top_k_keeps_the_k_best_renormalized() -> None:
    freq = _frequencies(PROBS, 2000, temperature=1.0, top_k=3)
    expected = torch.zeros_like(PROBS)
    expected[:3] = PROBS[:3] / PROBS[:3].sum()
    assert torch.allclose(freq, expected, atol=2e-3)


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    freq = _frequencies(PROBS, 2000, temperature=1.0, top_p=0.6)  # 0.4 + 0.25 >= 0.6
    expected = torch.zeros_like(PROBS)
    expected[:2] = PROBS[:2] / PROBS[:2].sum()
    assert torch.allclose(freq, expected, atol=2e-3)


def test_a_nucleus_wider_than_the_candidates_is_exact() -> None:
    vocab = 1000
    weights = 1.0 / torch.arange(200, 200 + vocab, device="cpu", dtype=torch.float32)
    probs = weights / weights.sum()  # a long, slowly falling tail: ~400 tokens make p=0.5
    nucleus = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(0.5))) + 1
    assert nucleus > 256
    freq = _frequencies(probs, 8000, temperature=1.0, top_p=0.5)
    assert int(freq[nucleus:].sum()) == 0 and float(freq[nucleus - 1]) > 0
    expected = probs[:nucleus] / probs[:nucleus].sum()
    assert torch.allclose(freq[:nucleus], expected, atol=6e-4)


def test_temperature_sharpens() -> None:
    cold = _frequencies(PROBS, 2000, temperature=0.25)
    assert float(cold[0]) > 0.8


class _PoisonSampler(Sampler):
    """Raises for any pass that includes a sequence seeded with ``POISON``."""

    POISON = 666

    def sample_with_logprobs(self, logits: torch.Tensor, seqs: list[Sequence],
                             uniforms: list[float] | None = None,
                             masks: torch.Tensor | None = None,
                             ) -> tuple[list[int], list[TokenLogprobs | None]]:
        if any(s.params.seed == self.POISON for s in seqs):
            raise RuntimeError("poisoned sampling")
        return super().sample_with_logprobs(logits, seqs, uniforms, masks)


def _outputs(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = collections.defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.id].append(out)
    return dict(outs)


CLEAN = {
    "greedy": SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=5,
                             ignore_eos=True),
    "topk": SamplingParams(max_tokens=10, temperature=0.7, top_k=8, seed=6, ignore_eos=True),
}


def _reference(model: torch.nn.Module) -> dict[str, list[int]]:
    ref = {}
    for rid, params in CLEAN.items():
        engine = tiny_engine(model)
        engine.add_request(EngineRequest(rid, [1, 4, 9, 16], params))
        ref[rid] = [t for o in _outputs(engine)[rid] for t in o.new_token_ids]
    return ref


def test_a_request_whose_sampling_raises_fails_alone() -> None:
    model = tiny_llama(torch.float32)
    reference = _reference(model)
    engine = tiny_engine(model)
    engine.sampler = _PoisonSampler([EOS])
    for rid, params in CLEAN.items():
        engine.add_request(EngineRequest(rid, [1, 4, 9, 16], params))
    engine.step()
    engine.step()
    engine.add_request(EngineRequest("bad", [1, 4, 9], SamplingParams(
        max_tokens=10, temperature=1.0, seed=_PoisonSampler.POISON)))
    outs = _outputs(engine)
    assert outs["bad"][-1].finish_reason == "error"
    assert "sampling failed" in (outs["bad"][-1].error or "")
    for rid in CLEAN:  # the rest of the batch keeps going, with the tokens it gets alone
        assert outs[rid][-1].finish_reason == "length"
        assert len([t for o in outs[rid] for t in o.new_token_ids]) == 8
        assert [t for o in outs[rid] for t in o.new_token_ids] == reference[rid][2:]
    assert engine.cache.num_rows == 0 and not engine.seqs


class _BrokenDetokenizer:
    stopped = False

    def add(self, token: int) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken on purpose")

    def take_delta(self, final: bool) -> str:
        return ""


def test_a_request_whose_post_processing_raises_fails_alone() -> None:
    model = tiny_llama(torch.float32)
    reference = _reference(model)
    engine = tiny_engine(model)
    for rid, params in CLEAN.items():
        engine.add_request(EngineRequest(rid, [1, 4, 9, 16], params))
    engine.add_request(EngineRequest("bad", [1, 4, 9], CLEAN["greedy"]))
    engine.detoks["bad"] = _BrokenDetokenizer()  # type: ignore[assignment]
    outs = _outputs(engine)
    assert outs["bad"][-1].finish_reason == "error"
    assert "post-processing failed" in (outs["bad"][-1].error or "")
    for rid in CLEAN:
        assert [t for o in outs[rid] for t in o.new_token_ids] == reference[rid]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_matches_cpu() -> None:
    seqs = [_seq(f"s{i}", **p) for i, p in enumerate(MIXED)]
    logits = _logits(len(seqs), seed=4)
    uniforms = [0.1 * i + 0.05 for i in range(len(seqs))]
    sampler = Sampler([EOS])
    on_cpu = sampler.sample(logits, seqs, uniforms)
    on_gpu = sampler.sample(logits.to("cuda"), seqs, uniforms)
    assert on_gpu == on_cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_engine_with_sampled_requests_runs_on_cuda() -> None:
    engine = tiny_engine(tiny_llama(torch.float32).to("cuda"))
    for i, p in enumerate(MIXED):
        engine.add_request(EngineRequest(f"r{i}", [1, 4 + i, 9], SamplingParams(
            max_tokens=6, ignore_eos=True, seed=i, **p)))  # type: ignore[arg-type]
    got = _drain(engine)
    assert sorted(got) == [f"r{i}" for i in range(len(MIXED))]
    assert all(len(tokens) == 6 for tokens in got.values())
