"""Where speculative decoding stops paying as the batch fills (issue 11, part 1).

For each workload and batch size, ``B`` greedy requests go into the engine at once and run
to the end; output tok/s with each speculative method (speculation forced on at every batch
size) against ``off``, and the share of proposed tokens accepted. The methods run one after
the other on the same loaded model, in rounds (``--rounds``), best round each.

    python -m bench.spec_crossover --batches 1,4,8,16,32 --methods off,ngram,draft:8

``draft:L`` is the self-draft from the model's first L layers; ``draft`` alone uses
``TOKENFLEET_DRAFT_MODEL`` when it is set, else ``TOKENFLEET_DRAFT_LAYERS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

WORKLOADS = ("copy", "chat")


@dataclass
class Cell:
    workload: str
    method: str
    batch: int
    tok_s: float = 0.0
    tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    same_tokens: bool | None = None  # greedy output equal to ``off``'s
    rounds: list[float] = field(default_factory=list)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


def prompts_for(tokenizer: Any, workload: str, n: int) -> list[list[int]]:
    from bench.workload import COPY_INSTRUCTION, COPY_TEXTS, PROMPTS

    out = []
    for i in range(n):
        text = (COPY_INSTRUCTION + COPY_TEXTS[i % len(COPY_TEXTS)] if workload == "copy"
                else PROMPTS[i % len(PROMPTS)])
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)
        out.append(list(chat if isinstance(chat, list) else chat["input_ids"]))
    return out


def run_batch(engine: Any, prompts: list[list[int]], max_tokens: int,
              ) -> tuple[float, list[list[int]]]:
    from shared.protocol import SamplingParams
    from worker.engine.types import EngineRequest

    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), ids, SamplingParams(
            max_tokens=max_tokens, temperature=0.0)))
    while engine.has_unfinished():
        for o in engine.step():
            out[o.id].extend(o.new_token_ids)
    return time.perf_counter() - start, [out[str(i)] for i in range(len(prompts))]


def make_engine(runner: Any, decoder: Any, eos: list[int], method: str, k: int,
                draft: Any) -> Any:
    from worker.engine.engine import EngineConfig, LLMEngine
    from worker.engine.speculative import SpeculativeConfig

    name, _, layers = method.partition(":")
    spec = SpeculativeConfig(name, num_tokens=k, max_rows=1 << 20,  # type: ignore[arg-type]
                             draft_layers=int(layers) if layers else 8)
    config = EngineConfig(eos_token_ids=tuple(eos), speculative=spec)
    return LLMEngine(runner, decoder, config,
                     draft=draft if name == "draft" and not layers else None)


def measure(batches: list[int], methods: list[str], workloads: list[str], max_tokens: int,
            k: int, rounds: int, on_batch: Callable[[list[Cell]], None] | None = None,
            ) -> list[Cell]:
    """``on_batch(cells so far)`` after each batch size (a run cut short keeps its data)."""
    from shared.settings import Settings
    from worker.engine.factory import eos_token_ids, load_draft, load_runner, warm_up
    from worker.model_store import resolve_model_path

    settings = Settings()  # the worker's kernels (TOKENFLEET_LINEAR/ATTENTION/COMPILE) too
    loaded, runner, _ = load_runner(settings, resolve_model_path(settings))
    eos = eos_token_ids(loaded)
    draft = load_draft(settings.model_copy(update={"speculative": "draft"}), loaded)
    decoder = loaded.tokenizer.backend_tokenizer
    engines = {m: make_engine(runner, decoder, eos, m, k, draft) for m in methods}
    for engine in engines.values():
        warm_up(engine)
    cells: list[Cell] = []
    for workload in workloads:
        prompts = prompts_for(loaded.tokenizer, workload, max(batches))
        for b in batches:
            row = {m: Cell(workload, m, b) for m in methods}
            reference: list[list[int]] | None = None
            for _ in range(rounds):
                for m in methods:
                    engine = engines[m]
                    before = engine.stats()
                    wall, outs = run_batch(engine, prompts[:b], max_tokens)
                    after = engine.stats()
                    cell = row[m]
                    cell.tokens = sum(map(len, outs))
                    cell.rounds.append(cell.tokens / wall)
                    cell.proposed += after.spec_proposed - before.spec_proposed
                    cell.accepted += after.spec_accepted - before.spec_accepted
                    if m == "off":
                        reference = outs
                    elif reference is not None:
                        cell.same_tokens = outs == reference
            for cell in row.values():
                cell.tok_s = max(cell.rounds)
                log.info("%s b%d %s: %.1f tok/s, acceptance %s", workload, b, cell.method,
                         cell.tok_s, cell.acceptance)
            cells.extend(row.values())
            if on_batch is not None:
                on_batch(cells)
    return cells


def markdown(cells: list[Cell]) -> str:
    lines = ["| workload | batch | method | tok/s | x off | acceptance | same greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    off = {(c.workload, c.batch): c.tok_s for c in cells if c.method == "off"}
    for c in cells:
        base = off.get((c.workload, c.batch))
        ratio = f"{c.tok_s / base:.2f}x" if base else "-"
        acc = "-" if c.acceptance is None else f"{c.acceptance:.0%}"
        same = "-" if c.same_tokens is None else ("yes" if c.same_tokens else "NO")
        lines.append(f"| {c.workload} | {c.batch} | {c.method} | {c.tok_s:.1f} | {ratio} | "
                     f"{acc} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_crossover")
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--methods", default="off,ngram,draft:8")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=4, help="k, tokens proposed a step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    if "off" not in methods:
        methods.insert(0, "off")
    command = "python -m bench.spec_crossover " + " ".join(argv or [])

    def save(cells: list[Cell]) -> None:
        if args.out is not None:
            args.out.write_text(json.dumps({
                "command": command, "load_average": list(os.getloadavg()),
                "cells": [asdict(c) | {"acceptance": c.acceptance} for c in cells]}, indent=2))

    cells = measure([int(b) for b in args.batches.split(",")], methods,
                    args.workloads.split(","), args.max_tokens, args.tokens, args.rounds, save)
    print(markdown(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
