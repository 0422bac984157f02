"""Compiled vs eager decode on the served model: greedy tokens and the largest logprob gap.

    TOKENFLEET_COMPILE=decode python -m bench.compile_check [--tokens 96] [--batch 4]

Prefills ``--batch`` chat-like prompts, then decodes greedily with the eager step and again
with the compiled step (same runner, same cache layout), teacher-forcing the compiled run on
the eager tokens so every step compares the same context. Prints whether the free greedy
choices agree at every step and the largest absolute log-probability difference over the
whole vocabulary (and over the eager top-1 token).
"""

from __future__ import annotations

import argparse

import torch

from bench.step_profile import build_runner
from shared.settings import Settings
from worker.engine.model_runner import PrefillChunk, TransformerRunner

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning' into German and Spanish.",
    "def fibonacci(n):",
    "The quick brown fox",
    "Once upon a time, in a small village,",
]


def _decode(runner: TransformerRunner, prompts: list[list[int]], forced: list[list[int]] | None,
            steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    cache = runner.cache
    for seq_id in list(cache._row_of):
        cache.free(seq_id)
    for i in range(len(prompts)):
        cache.allocate(f"s{i}")
    cache.ensure_capacity(len(prompts), max(map(len, prompts)) + steps + 1)
    logits = runner.prefill([PrefillChunk(i, 0, p, True) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        cache.advance(f"s{i}", len(p))
    pos = [len(p) for p in prompts]
    chosen, logprobs = [], []
    tokens = logits.argmax(-1).tolist()
    for step in range(steps):
        feed = forced[step] if forced is not None else tokens
        chosen.append(tokens)
        logits = runner.decode(feed, pos)
        logprobs.append(torch.log_softmax(logits, dim=-1))
        tokens = logits.argmax(-1).tolist()
        for i in range(len(prompts)):
            cache.advance(f"s{i}", 1)
            pos[i] += 1
    return chosen, logprobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--eager-twice", action="store_true",
                        help="run eager in both passes (how reproducible eager itself is)")
    args = parser.parse_args(argv)
    settings = Settings()
    runner = build_runner(settings)
    compiled = runner.compiled
    if compiled is None:
        raise SystemExit("needs TOKENFLEET_COMPILE=decode")
    from transformers import AutoTokenizer

    from worker.model_store import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                       add_generation_prompt=True)
               for p in PROMPTS[:args.batch]]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    with torch.inference_mode():
        runner.compiled = None
        eager_tokens, eager_lp = _decode(runner, prompts, None, args.tokens)
        runner.compiled = None if args.eager_twice else compiled
        tokens, lp = _decode(runner, prompts, eager_tokens, args.tokens)
    diffs = [(a - b).abs().max().item() for a, b in zip(eager_lp, lp, strict=True)]
    first = next((i for i, d in enumerate(diffs) if d > 0), None)
    agree = sum(a == b for a, b in zip(eager_tokens, tokens, strict=True))
    gap = max((a - b).abs().max().item() for a, b in zip(eager_lp, lp, strict=True))
    top = max(
        (a.gather(1, a.argmax(1, keepdim=True)) - b.gather(1, a.argmax(1, keepdim=True)))
        .abs().max().item() for a, b in zip(eager_lp, lp, strict=True))
    print(f"dtype {runner.dtype}, batch {args.batch}, {args.tokens} steps: greedy choices "
          f"equal at {agree}/{args.tokens} steps (all rows); largest logprob difference "
          f"{gap:.3g} over the vocabulary, {top:.3g} at the eager top-1 token; first step "
          f"with any difference: {first} (of {args.tokens})")


if __name__ == "__main__":
    main()
