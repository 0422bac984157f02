"""The ``quant`` system of ``tokenfleet bench`` (issue 11, part 2): each quantization mode's
speed at batch 1/8/32/64 in the engine, plain ``model.generate`` at batch 1, weight
footprint, greedy agreement with the unquantized model, perplexity on
``bench/data/perplexity.txt``, and for ``int8-torch`` the load time of a pre-quantized
checkpoint against quantizing at load.

Also ``python -m bench.quant [--modes ...] [--batches ...] [--max-tokens N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.machine import cpu_model

if TYPE_CHECKING:
    from bench.cli import Bench

log = logging.getLogger("bench")

TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"
# "none" runs in TOKENFLEET_DTYPE=auto (bf16 where native); "none-float32" forces float32.
DEFAULT_MODES = ("none", "none-float32", "int8-torch", "nf4", "int8")
DEFAULT_BATCHES = (1, 8, 32, 64)
AGREEMENT_PROMPTS = 8
PERPLEXITY_WINDOW = 256
BATCH_BUDGET_S = 60.0  # a batch size that took longer skips the larger ones


@dataclass
class ModeResult:
    mode: str
    dtype: str = ""
    load_s: float = 0.0
    weight_mib: float = 0.0
    tok_s: dict[int, float] = field(default_factory=dict)
    generate_tok_s: float | None = None
    agreement: float | None = None  # share of greedy tokens equal to the reference's
    perplexity: float | None = None
    prepared_load_s: float | None = None
    prepared_disk_mib: float | None = None
    disk_mib: float | None = None
    note: str = ""


def mode_settings(base: Any, mode: str) -> Any:
    if mode == "none-float32":
        return base.model_copy(update={"quantization": "none", "dtype": "float32"})
    return base.model_copy(update={"quantization": mode})


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> float:
    """Mean over prompts of the greedy prefix shared with the reference, as a share of its
    length (a token after the first difference counts as different)."""
    shares = []
    for ref, got in zip(reference, tokens, strict=True):
        same = 0
        for a, b in zip(ref, got, strict=False):
            if a != b:
                break
            same += 1
        shares.append(same / max(len(ref), 1))
    return sum(shares) / len(shares) if shares else 0.0


def perplexity(model: Any, ids: list[int], window: int = PERPLEXITY_WINDOW) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the text."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total += float(nll)
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def _engine_run(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float,
                                                                                 list[list[int]]]:
    from shared.protocol import SamplingParams
    from worker.engine.types import EngineRequest

    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), ids, SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    while engine.has_unfinished():
        for o in engine.step():
            out[o.id].extend(o.new_token_ids)
    return time.perf_counter() - start, [out[str(i)] for i in range(len(prompts))]


def _generate_tok_s(loaded: Any, ids: list[int], max_tokens: int) -> float:
    import torch

    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.tensor([ids])
    with torch.inference_mode():
        loaded.model.generate(input_ids=x, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                              max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=pad)
    return max_tokens / (time.perf_counter() - start)


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from bench.workload import PROMPTS

    prompts = []
    for i in range(n):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(
            PROMPTS)]}], add_generation_prompt=True)
        prompts.append(list(chat if isinstance(chat, list) else chat["input_ids"]))
    return prompts


def measure_mode(settings: Any, mode: str, batches: tuple[int, ...], max_tokens: int,
                 reference: list[list[int]] | None) -> tuple[ModeResult, list[list[int]]]:
    from worker.engine.engine import LLMEngine
    from worker.engine.factory import engine_config, eos_token_ids, warm_up
    from worker.engine.loader import load_model
    from worker.engine.model_runner import TransformerRunner
    from worker.model_store import resolve_model_path

    s = mode_settings(settings, mode)
    path = resolve_model_path(s)
    start = time.perf_counter()
    loaded = load_model(s, path, use_prepared=False)
    result = ModeResult(mode, str(loaded.dtype).removeprefix("torch."),
                        time.perf_counter() - start, loaded.memory_bytes / 2**20)
    result.disk_mib = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
    engine = LLMEngine(TransformerRunner(loaded.model), loaded.tokenizer.backend_tokenizer,
                       engine_config(s, eos_token_ids(loaded)))
    warm_up(engine)
    prompts = chat_prompts(loaded.tokenizer, max(max(batches), AGREEMENT_PROMPTS))
    tokens: list[list[int]] = []
    for b in sorted(batches):
        wall, outs = _engine_run(engine, prompts[:b], max_tokens)
        result.tok_s[b] = b * max_tokens / wall
        log.info("quant %s batch %d: %.1f tok/s", mode, b, result.tok_s[b])
        if b >= AGREEMENT_PROMPTS and not tokens:
            tokens = outs[:AGREEMENT_PROMPTS]
        if wall > BATCH_BUDGET_S:
            result.note = f"batch {b} took {wall:.0f} s; larger batches skipped"
            break
    if not tokens:
        _, tokens = _engine_run(engine, prompts[:AGREEMENT_PROMPTS], max_tokens)
    if 1 in batches:
        result.generate_tok_s = _generate_tok_s(loaded, prompts[0], max_tokens)
    if reference is not None:
        result.agreement = agreement(reference, tokens)
    ids = loaded.tokenizer(TEXT.read_text()).input_ids
    result.perplexity = perplexity(loaded.model, list(ids))
    return result, tokens


def measure_prepared(settings: Any, result: ModeResult) -> None:
    """Write the pre-quantized checkpoint to a temporary model dir and time loading it."""
    from worker.engine.loader import load_model, prepare_quantized
    from worker.model_store import resolve_model_path

    source = resolve_model_path(settings)
    with tempfile.TemporaryDirectory() as tmp:
        s = settings.model_copy(update={"quantization": result.mode, "model": str(source),
                                        "model_dir": Path(tmp)})
        target = prepare_quantized(s, result.mode)
        start = time.perf_counter()
        load_model(s, source)  # finds the prepared weights
        result.prepared_load_s = time.perf_counter() - start
        result.prepared_disk_mib = sum(p.stat().st_size for p in target.glob("*.safetensors")
                                       ) / 2**20


def run_modes(settings: Any, modes: tuple[str, ...], batches: tuple[int, ...],
              max_tokens: int) -> list[ModeResult]:
    results: list[ModeResult] = []
    reference: list[list[int]] | None = None
    for mode in modes:
        try:
            result, tokens = measure_mode(settings, mode, batches, max_tokens, reference)
        except Exception as exc:  # report, don't hide: a mode that cannot run here
            log.exception("quant %s failed", mode)
            results.append(ModeResult(mode, note=f"failed: {exc}"))
            continue
        if reference is None:
            reference, result.agreement = tokens, 1.0
        if mode == "int8-torch":
            measure_prepared(settings, result)
        results.append(result)
        log.info("quant %s: %s", mode, asdict(result))
    return results


def markdown(results: list[ModeResult], batches: tuple[int, ...]) -> str:
    head = ["mode", "dtype", "weights MiB"] + [f"tok/s b{b}" for b in batches] + [
        "generate b1", "greedy agreement", "perplexity", "load s", "pre-quantized load s",
        "disk MiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in results:
        cells = [r.mode, r.dtype, f(r.weight_mib)] + [f(r.tok_s.get(b)) for b in batches] + [
            f(r.generate_tok_s), "-" if r.agreement is None else f"{r.agreement:.0%}",
            f(r.perplexity, 2), f(r.load_s, 2), f(r.prepared_load_s, 2),
            f(r.prepared_disk_mib if r.prepared_disk_mib is not None else r.disk_mib),
            r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_quant(bench: Bench) -> None:
    """The bench entry: every mode of ``--quant-modes``; the table goes into the report's
    meta (``quantization``) and the log."""
    modes = tuple(m.strip() for m in bench.args.quant_modes.split(",") if m.strip())
    batches = (1, 8) if bench.args.quick else DEFAULT_BATCHES
    max_tokens = 4 if bench.args.quick else 16
    results = run_modes(bench.settings, modes, batches, max_tokens)
    bench.meta["quantization"] = [asdict(r) for r in results]
    bench.meta["quantization_table"] = markdown(results, batches)
    log.info("quantization modes:\n%s", bench.meta["quantization_table"])


def main(argv: list[str] | None = None) -> int:
    from shared.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.quant")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    batches = tuple(int(b) for b in args.batches.split(","))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a cast warning per call
    settings = Settings()
    results = run_modes(settings, tuple(args.modes.split(",")), batches, args.max_tokens)
    table = markdown(results, batches)
    print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(report(settings, results, args), indent=2) + "\n")
    return 0


def report(settings: Any, results: list[ModeResult], args: argparse.Namespace) -> dict[str, Any]:
    """What ``--out`` writes: the results with the model, machine and command they came
    from (``bench/data/quant_quality.json`` is one; ``worker.engine.quant_choice`` reads the
    quality columns of it)."""
    import os

    import torch

    from worker.engine.loader import torch_cpu_capability
    from worker.model_store import resolve_model_path

    return {
        "model": resolve_model_path(settings).name,
        "command": (f"python -m bench.quant --modes {args.modes} --batches {args.batches} "
                    f"--max-tokens {args.max_tokens}"),
        "machine": {"cpu": cpu_model(),
                    "cpu_capability": torch_cpu_capability(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_average": list(os.getloadavg())},
        "text": str(TEXT.relative_to(TEXT.parents[2])),
        "modes": [asdict(r) for r in results],
    }


if __name__ == "__main__":
    raise SystemExit(main())
