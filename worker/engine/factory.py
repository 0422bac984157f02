"""Builds the engine a worker serves with, and the ``ModelInfo`` it publishes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import ModelLoadError
from shared.model_info import ModelInfo
from shared.protocol import SamplingParams
from shared.settings import Settings
from worker.engine.compile_warmup import CompileWarmup
from worker.engine.engine import EngineConfig, LLMEngine
from worker.engine.grammar import GrammarBackend
from worker.engine.loader import LoadedModel, load_model
from worker.engine.model_runner import TransformerRunner
from worker.engine.native_attention import attach as attach_native_attention
from worker.engine.native_linear import attach as attach_native_linear
from worker.engine.native_pointwise import attach as attach_native_pointwise
from worker.engine.speculative import SpeculativeConfig
from worker.engine.types import EngineRequest
from worker.model_store import generation_defaults

log = logging.getLogger(__name__)


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids: set[int] = set()
    generation = getattr(loaded.model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None),
                   getattr(loaded.tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def model_info(settings: Settings, loaded: LoadedModel, max_context: int) -> ModelInfo:
    tok = loaded.tokenizer
    tokenizer_file = Path(loaded.path) / "tokenizer.json"
    raw = (tokenizer_file.read_bytes() if tokenizer_file.exists()
           else tok.backend_tokenizer.to_str().encode())
    template = getattr(tok, "chat_template", None) or ""
    probe = tok("a").input_ids
    return ModelInfo(
        name=settings.model_name,
        max_context=max_context,
        vocab_size=int(loaded.model.config.vocab_size),
        tokenizer_json=raw,
        chat_template=template if isinstance(template, str) else "",
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
        eos_token_ids=eos_token_ids(loaded),
        add_bos_token=bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]),
        quantization=loaded.quantization,
        dtype=str(loaded.dtype).removeprefix("torch."),
        generation_defaults=generation_defaults(Path(loaded.path)),
        max_batch_tokens=settings.max_batch_tokens,
    )


def engine_config(settings: Settings, eos: list[int]) -> EngineConfig:
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        max_waiting=settings.max_waiting,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        eos_token_ids=tuple(eos),
        scheduling=settings.scheduling,
        phase_max_prefill_steps=settings.phase_max_prefill_steps,
        reserve_rows=settings.interactive_reserve_rows,
        speculative=SpeculativeConfig(
            method=settings.speculative, num_tokens=settings.speculative_tokens,
            max_num_tokens=settings.speculative_tokens_max,
            ngram_max=settings.speculative_ngram, ngram_min=1,
            max_rows=settings.speculative_max_rows, draft_layers=settings.draft_layers),
    )


def load_draft(settings: Settings, target: LoadedModel) -> TransformerRunner | None:
    """The draft model's runner (``TOKENFLEET_SPECULATIVE=draft`` with
    ``TOKENFLEET_DRAFT_MODEL``), unquantized, in the target's dtype; None for a self-draft
    or another method. Its tokenizer must be the target's (the same vocabulary)."""
    if settings.speculative != "draft" or not settings.draft_model:
        return None
    path = Path(settings.draft_model)
    if not path.is_dir():
        raise ModelLoadError(f"TOKENFLEET_DRAFT_MODEL={path} is not a local model directory")
    draft = load_model(settings.model_copy(update={
        "model": str(path), "quantization": "none",
        "dtype": str(target.dtype).removeprefix("torch.")}), path, use_prepared=False)
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ModelLoadError(f"the draft model at {path} does not use the model's tokenizer")
    runner = TransformerRunner(draft.model)
    log.info("speculative draft: %s (%d layers, %.1f MiB)", path.name, len(runner.layers),
             draft.memory_bytes / 2**20)
    return runner


def grammar_backend(loaded: LoadedModel, vocab_size: int,
                    eos: list[int]) -> GrammarBackend | None:
    """Structured outputs for this tokenizer; None (requests that need them fail with a
    message saying so) when xgrammar is not installed or cannot read the tokenizer."""
    try:
        start = time.perf_counter()
        backend = GrammarBackend.from_hf_tokenizer(loaded.tokenizer, vocab_size, eos)
        log.info("structured outputs ready (xgrammar, %.2f s)", time.perf_counter() - start)
        return backend
    except ImportError:
        log.warning("xgrammar is not installed: structured outputs and tool_choice "
                    "required/named are unavailable")
    except Exception:
        log.exception("xgrammar cannot use this tokenizer: structured outputs unavailable")
    return None


def warm_up(engine: LLMEngine) -> float:
    """One short request through prefill and decode, so first users don't pay for it."""
    start = time.perf_counter()
    engine.add_request(EngineRequest("warmup", [1, 2, 3, 4, 5, 6, 7, 8],
                                     SamplingParams(max_tokens=4, temperature=0,
                                                    ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def attach_kernels(runner: TransformerRunner, settings: Settings) -> None:
    """``TOKENFLEET_LINEAR``, ``TOKENFLEET_ATTENTION`` and ``TOKENFLEET_POINTWISE``'s native
    kernels (each falls back to torch's with a warning); before a compiled step is built,
    which runs through the first two."""
    attach_native_linear(runner, settings.linear)
    attach_native_attention(runner, settings.attention)
    attach_native_pointwise(runner, settings.pointwise)


def load_runner(settings: Settings, path: Path,
                ) -> tuple[LoadedModel, TransformerRunner, float | None]:
    """The model at ``path`` in a runner with the native kernels attached and, where
    ``TOKENFLEET_COMPILE`` asks, its compiled graphs built now (blocking): what the bench's
    in-process systems and profilers run. Returns the compile warm-up's seconds (None:
    nothing compiled). The worker's ``build_engine`` builds the graphs around its warm-up."""
    from worker.engine.compiled_step import attach

    loaded = load_model(settings, path)
    runner = TransformerRunner(loaded.model)
    attach_kernels(runner, settings)  # first: the compiled graph runs through them
    return loaded, runner, attach(runner, settings.compile)


def build_engine(settings: Settings, on_stage: Callable[[str], None] | None = None,
                 ) -> tuple[LLMEngine, ModelInfo]:
    """``on_stage("weights")`` once the checkpoint is loaded, ``on_stage("warmup")`` after
    the warm-up (the worker's cold-start clock). ``TOKENFLEET_COMPILE``'s graphs are built
    before the engine's warm-up (``TOKENFLEET_COMPILE_WARMUP=blocking``) or in a thread
    started after it (``background``: decode runs eager until they are attached; the
    runner's ``compile_state`` says where that stands)."""
    from worker.model_store import resolve_model_path

    path = resolve_model_path(settings)
    loaded = load_model(settings, path)
    runner = TransformerRunner(loaded.model)
    attach_kernels(runner, settings)  # first: the compiled graph runs through them
    compile_warmup = CompileWarmup(runner, settings.compile)
    if settings.compile_warmup == "blocking":
        compile_warmup.start("blocking")  # compiles or loads the graphs before serving
    eos = eos_token_ids(loaded)
    engine = LLMEngine(runner, loaded.tokenizer.backend_tokenizer, engine_config(settings, eos),
                       grammars=grammar_backend(loaded, runner.vocab_size, eos),
                       draft=load_draft(settings, loaded))
    if on_stage is not None:
        on_stage("weights")
    log.info("warm-up took %.2f s", warm_up(engine))
    info = model_info(settings, loaded, runner.max_context)
    if settings.compile_warmup == "background":
        compile_warmup.start("background")  # the engine is ready: serve eager meanwhile
    if on_stage is not None:
        on_stage("warmup")
    return engine, info
