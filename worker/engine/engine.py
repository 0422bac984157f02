"""The engine: glue of scheduler, KV cache, model runner, sampler and detokenizers.

``step()`` is: apply aborts, schedule, run decode and prefill, sample, post-process (append
tokens, detokenize, check stops, free finished rows). No Redis, no threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.protocol import SamplingParams
from worker.engine.choices import ChoiceGroups
from worker.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from worker.engine.draft import DraftProposer, early_exit_runner
from worker.engine.grammar import GrammarBackend, GrammarError
from worker.engine.model_runner import ModelRunner, PrefillChunk, TransformerRunner
from worker.engine.prefix_cache import PrefixCache
from worker.engine.prefix_inflight import InflightBlocks
from worker.engine.sampler import Sampler, TokenLogprobs
from worker.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SchedulingPolicy,
)
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.speculative import SpeculativeConfig, Speculator, accepted_run
from worker.engine.types import EngineRequest, EngineStats, RequestOutput

log = logging.getLogger(__name__)

# a waiting request waits for a running row's prefill when that saves it at least this many
# prompt blocks (SGLang's in-batch prefix sharing threshold is 32 tokens: 2 blocks of 16)
SHARED_BLOCKS_TO_WAIT = 2

Sampled = tuple[Sequence, int, "TokenLogprobs | None"]  # a row, its token, its logprobs


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 32768
    max_prefill_tokens: int = 512
    max_waiting: int = 16  # requests held beyond the running batch
    prefix_cache_tokens: int = 0  # pool of cached prompt blocks (0 = no prefix caching)
    prefix_block_size: int = 16
    eos_token_ids: tuple[int, ...] = ()
    scheduling: SchedulingPolicy = "mixed"  # see worker/engine/scheduler.py
    phase_max_prefill_steps: int = 0  # phase: prefill-only steps in a row (0: no bound)
    reserve_rows: int = 0  # rows only priority-0 requests may take (SchedulerConfig)
    # speculative decoding (worker/engine/speculative.py)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)


class LLMEngine:
    def __init__(self, runner: ModelRunner, decoder: TokenDecoder, config: EngineConfig,
                 grammars: GrammarBackend | None = None,
                 draft: ModelRunner | None = None) -> None:
        """``draft``: the draft model's runner (own cache) for ``speculative.method ==
        "draft"``; without one, the draft is the target's first ``draft_layers`` layers."""
        self.runner = runner
        self.grammars = grammars  # structured outputs; None: requests that need one fail
        self.decoder = decoder
        self.config = config
        self.cache = runner.cache
        self.cache.token_budget = config.max_batch_tokens
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_prefill_tokens=config.max_prefill_tokens,
            max_context=runner.max_context,
            policy=config.scheduling,
            reserve_rows=config.reserve_rows,
            phase_max_prefill_steps=config.phase_max_prefill_steps,
        ), on_admit=self._admit, should_wait=self._should_wait)
        self.prefix: PrefixCache | None = None
        if config.prefix_cache_tokens >= config.prefix_block_size:
            self.prefix = PrefixCache(self.cache.shape, config.prefix_cache_tokens,
                                      config.prefix_block_size)
        self.inflight = InflightBlocks(config.prefix_block_size)  # prompt blocks computing now
        self._hits: dict[str, tuple[int, list[int]]] = {}  # admitted, hit not copied in yet
        self.sampler = Sampler(list(config.eos_token_ids))
        self.speculator = Speculator(config.speculative,
                                     self._draft_proposer(runner, config.speculative, draft))
        self.eos = frozenset(config.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self._aborts: set[str] = set()
        self._early: list[RequestOutput] = []  # rejected at add time, reported next step
        self.choices = ChoiceGroups(self._abort_member)  # n > 1
        self._steps = 0

    # --- the Engine protocol ----------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        if request.id in self.seqs:
            raise ValueError(f"request {request.id} is already in the engine")
        problem = self._validate(request)
        if problem:
            self._early.append(RequestOutput(
                id=request.id, finished=True, finish_reason="error", error=problem,
                num_prompt_tokens=len(request.prompt_token_ids)))
            return
        seq = Sequence(request.id, list(request.prompt_token_ids), request.params,
                       request.arrival_time, request.priority)
        try:
            seq.matcher = self._matcher(request.params)
            if request.params.seed is not None and not request.params.is_greedy:
                seq.generator = torch.Generator(device="cpu").manual_seed(request.params.seed)
            self.scheduler.add(seq)
        except (ValueError, RuntimeError) as exc:  # GrammarError is a ValueError
            self._early.append(RequestOutput(id=request.id, finished=True, finish_reason="error",
                                             error=str(exc),
                                             num_prompt_tokens=seq.num_prompt_tokens))
            return
        self._track(seq)
        if seq.params.n > 1:
            self.choices.add(seq)

    def _track(self, seq: Sequence) -> None:
        self.seqs[seq.id] = seq
        self.detoks[seq.id] = IncrementalDetokenizer(self.decoder, seq.prompt_token_ids,
                                                     seq.params.stop)

    def abort_request(self, request_id: str) -> None:
        for seq_id in self.choices.members(request_id) or [request_id]:
            self._abort_member(seq_id)

    def _abort_member(self, seq_id: str) -> None:
        if seq_id in self.seqs:
            self._aborts.add(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self._early)

    def release_idle_memory(self) -> None:
        """No request for a while: hand the KV cache's buffers back (the next step
        allocates them again). Nothing happens while a request is in the engine."""
        if not self.has_unfinished() and not self.cache.num_sequences:
            self.cache.release()

    def num_free_slots(self) -> int:
        """Requests to take on: the rows the KV budget can run at the longest reservation
        held (``max_batch_tokens // longest``, at most ``max_batch_size``), plus as many
        waiting (at most ``max_waiting``), minus what is held. A worker full of long rows
        therefore asks for a few entries, not for ``max_batch_size + max_waiting``."""
        held = [*self.scheduler.running, *self.scheduler.waiting]
        longest = max((s.reserved_len for s in held), default=0)
        rows = self.config.max_batch_size
        if longest:
            rows = max(1, min(rows, self.config.max_batch_tokens // longest))
        return max(0, rows + min(self.config.max_waiting, rows) - len(held))

    def stats(self) -> EngineStats:
        stats = EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_tokens_used=self.cache.num_tokens,
            kv_tokens_budget=self.config.max_batch_tokens,
            steps=self._steps,
            spec_proposed=self.speculator.num_proposed,
            spec_accepted=self.speculator.num_accepted,
            compiled=getattr(self.runner, "compile_state", "off"),
        )
        if self.prefix is not None:
            p = self.prefix.stats
            stats.prefix_cache_hits, stats.prefix_cache_misses = p.hits, p.misses
            stats.prefix_cache_hit_tokens = p.hit_tokens
            stats.prefix_cache_query_tokens = p.query_tokens
            stats.prefix_cache_tokens = self.prefix.num_tokens
            stats.prefix_cache_capacity = self.prefix.capacity_tokens
        return stats

    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        if not self.choices.member_of:
            return outputs
        return [out for out in map(self.choices.rewrite, outputs) if out is not None]

    def _step(self) -> list[RequestOutput]:
        outputs, self._early = self._early, []
        outputs.extend(self._apply_aborts())
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        self._steps += 1
        try:
            drafts = self.speculator.propose(plan.decodes, self.runner.max_context)
        except Exception:  # a failing draft costs the speedup, never the requests
            log.exception("speculative proposals failed; decoding this step plainly")
            drafts = {}
        try:
            sampled, logits = self._run(plan, drafts)
        except Exception:  # any failure: find the culprit, keep the rest
            log.exception("batch step failed; retrying its %d requests one by one",
                          len(plan.decodes) + len(plan.prefills))
            drafts = {}  # the retry decodes plainly
            sampled, logits, failed = self._run_isolated(plan)
            outputs.extend(failed)
        if sampled and self.choices.groups:
            sampled, logits = self._fork(sampled, logits)
        if sampled:
            states = {s.id: s.generator.get_state() for s in plan.decodes
                      if s.id in drafts and s.generator is not None and not s.params.is_greedy}
            tokens, failed = self._sample_isolated(sampled, logits)
            outputs.extend({o.id: o for o in failed}.values())  # a verified row fails once
            for seq, runs in self._accept(tokens, drafts, states):
                if len(runs) == 1 and seq.id not in drafts:
                    outputs.append(self._postprocess_safely(seq, *runs[0]))
                elif seq.id in self.seqs:  # not failed while sampling
                    outputs.append(self._verified_safely(seq, runs))
        return outputs

    def _fork(self, sampled: list[Sequence],
              logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """n > 1: a request whose prompt is now complete forks its other choices (a copy of
        its KV row each); they are sampled from the same logits row in this step."""
        order: list[int] = []
        seqs: list[Sequence] = []
        for i, seq in enumerate(sampled):
            order.append(i)
            seqs.append(seq)
            if not self.choices.wants_fork(seq):
                continue
            for child in self.choices.fork_children(seq):
                self.cache.fork(seq.id, child.id)
                self.scheduler.running.append(child)
                self._track(child)
                order.append(i)
                seqs.append(child)
        if len(seqs) == len(sampled):
            return sampled, logits
        return seqs, logits.index_select(0, torch.tensor(order, device=logits.device))

    def _accept(self, tokens: list[Sampled], drafts: dict[str, list[int]],
                states: dict[str, torch.Tensor],
                ) -> list[tuple[Sequence, list[tuple[int, TokenLogprobs | None]]]]:
        """Group a step's picks per row; a verified row keeps its accepted run
        (worker/engine/speculative.py) and its cache advances by it. Every row advances
        before any is post-processed: a row freed there moves another row's cache, which
        copies only the positions counted as written."""
        out: list[tuple[Sequence, list[tuple[int, TokenLogprobs | None]]]] = []
        i = 0
        while i < len(tokens):
            seq = tokens[i][0]
            if seq.id not in drafts:
                out.append((seq, [(tokens[i][1], tokens[i][2])]))
                i += 1
                continue
            group = []
            while i < len(tokens) and tokens[i][0] is seq:
                group.append((tokens[i][1], tokens[i][2]))
                i += 1
            draft = drafts[seq.id]
            if len(group) != len(draft) + 1 or seq.id not in self.seqs:
                continue  # failed while sampling
            run = accepted_run(draft, [token for token, _ in group])
            self.speculator.record(seq.id, len(draft), len(run) - 1)
            state = states.get(seq.id)
            if state is not None and seq.generator is not None:
                seq.generator.set_state(state)  # one uniform per emitted token, as without
                self.sampler.draw([seq] * len(run))
            seq.num_cached += len(run)
            self.cache.advance(seq.id, len(run))
            out.append((seq, group[:len(run)]))
        return out

    # --- internals --------------------------------------------------------------------------
    @staticmethod
    def _draft_proposer(runner: ModelRunner, spec: SpeculativeConfig,
                        draft: ModelRunner | None) -> DraftProposer | None:
        if spec.method != "draft":
            return None
        if draft is None:
            if not isinstance(runner, TransformerRunner):
                raise ValueError("a self-draft needs the target's TransformerRunner")
            draft = early_exit_runner(runner, min(spec.draft_layers, len(runner.layers)))
            log.info("speculative draft: the target's first %d of %d layers (self-draft)",
                     len(draft.layers), len(runner.layers))
        elif draft.vocab_size != runner.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.vocab_size}) is not the "
                             f"target's ({runner.vocab_size})")
        return DraftProposer(draft)

    def _matcher(self, params: SamplingParams) -> Any:
        if not params.guided_kind:
            return None
        if self.grammars is None:
            raise GrammarError("structured outputs are not available on this worker "
                               "(install the worker extra: xgrammar)")
        return self.grammars.matcher(params.guided_kind, params.guided_value)

    def _masks(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor | None:
        """The grammar masks of a step's rows; None (no work) when no row has a grammar."""
        if self.grammars is None or all(s.matcher is None for s in seqs):
            return None
        return self.grammars.masks([s.matcher for s in seqs], logits.shape[-1], logits.device)

    def _admit(self, seq: Sequence) -> None:
        """A sequence joins the batch: give it a row and find its cached prefix, if any. The
        hit counts as in its row at once (the scheduler cuts the first chunk after it); the
        copy waits for ``_run``, which sizes the cache once for everything admitted in the
        step (growing it admission by admission would copy the batch over and over)."""
        self.cache.allocate(seq.id)
        if self.prefix is None:
            return
        hit, slots = self.prefix.match(seq.prompt_token_ids)
        self.prefix.record(seq.num_prompt_tokens, hit)
        if hit:
            self._hits[seq.id] = (hit, slots)
            seq.num_cached = hit
            self.cache.advance(seq.id, hit)
        self.inflight.start(seq.id, seq.prompt_token_ids, hit)

    def _should_wait(self, seq: Sequence) -> bool:
        """Hold a waiting sequence back while running rows prefill at least
        ``SHARED_BLOCKS_TO_WAIT`` of its next uncached prompt blocks (they reach the prefix
        cache chunk by chunk, and it then copies them instead of computing them again)."""
        if self.prefix is None or not self.inflight:
            return False
        cached = self.prefix.peek(seq.prompt_token_ids)
        ahead = self.inflight.ahead(seq.prompt_token_ids, cached)
        bs = self.prefix.block_size
        return (ahead >= SHARED_BLOCKS_TO_WAIT
                and (cached // bs + ahead) * bs <= self.prefix.capacity_tokens)

    def _copy_hits(self, plan: SchedulerOutput) -> None:
        """Copy the prefixes found at admission into the rows of this plan (the cache is
        sized), all in one pass; if that fails, one by one, and one that cannot be copied
        is prefilled instead."""
        pending = [(chunk, hit) for chunk in plan.prefills
                   if (hit := self._hits.pop(chunk.seq.id, None)) is not None]
        if not pending:
            return
        assert self.prefix is not None
        if len(pending) > 1:
            try:
                self.prefix.load_many(self.cache, [
                    (self.cache.row_of(chunk.seq.id), *hit) for chunk, hit in pending])
                return
            except (RuntimeError, MemoryError) as exc:
                log.warning("copying %d cached prefixes at once failed, one by one: %r",
                            len(pending), exc)
        for chunk, hit in pending:
            try:
                self.prefix.load(self.cache, self.cache.row_of(chunk.seq.id), *hit)
            except (RuntimeError, MemoryError) as exc:
                log.warning("copying a cached prefix failed, prefilling it: %r", exc)
                self._prefill_hit(chunk)

    def _prefill_hit(self, chunk: ScheduledChunk) -> None:
        """Undo a hit not copied in: the chunk starts at the prompt's first token."""
        hit = chunk.start
        chunk.seq.num_cached -= hit
        self.cache.advance(chunk.seq.id, -hit)
        chunk.start, chunk.length = 0, chunk.length + hit

    def _remember_prompts(self, plan: SchedulerOutput) -> None:
        """Put the prompt blocks this step computed into the prefix cache at once, chunk by
        chunk (best effort): a request waiting for them can be admitted at the next step."""
        if self.prefix is None:
            return
        for c in plan.prefills:
            if c.completes_prompt:
                self.inflight.done(c.seq.id)
            end = c.start + c.length
            if end < self.prefix.block_size:
                continue
            try:
                self.prefix.insert(self.cache, self.cache.row_of(c.seq.id),
                                   c.seq.prompt_token_ids[:end])
            except (RuntimeError, MemoryError) as exc:
                log.warning("caching the prompt of %s failed: %r", c.seq.id, exc)

    def _validate(self, request: EngineRequest) -> str | None:
        ids = request.prompt_token_ids
        if not ids:
            return "empty prompt"
        if len(ids) >= self.runner.max_context:
            return (f"prompt is {len(ids)} tokens; the model's context is "
                    f"{self.runner.max_context}")
        if min(ids) < 0 or max(ids) >= self.runner.vocab_size:
            return f"prompt has token ids outside the vocabulary (size {self.runner.vocab_size})"
        return None

    def _run(self, plan: SchedulerOutput, drafts: dict[str, list[int]] | None = None,
             ) -> tuple[list[Sequence], torch.Tensor]:
        """Forward passes for a plan. Sequence state changes only once all of them succeed,
        so a failed step can be retried (re-writing the same cache positions is harmless).

        Rows with a proposal in ``drafts`` are verified: their last token and the proposal
        go in as one chunk of the prefill pass, with logits at every position; ``sampled``
        lists such a row once per position (its cache advances once accepted)."""
        drafts = drafts or {}
        decodes = [s for s in plan.decodes if s.id not in drafts]
        verifies = [s for s in plan.decodes if s.id in drafts]
        longest = max([s.num_cached + 1 for s in decodes]
                      + [s.num_cached + 1 + len(drafts[s.id]) for s in verifies]
                      + [c.start + c.length for c in plan.prefills])
        self.cache.ensure_capacity(self.cache.num_rows, longest)
        self._copy_hits(plan)
        if decodes:  # rows 0 .. B-1, in the order that moves the fewest rows
            by_id = {s.id: s for s in decodes}
            decodes = [by_id[sid] for sid in self.cache.gather_front(list(by_id))]
        chunks = [PrefillChunk(self.cache.row_of(c.seq.id), c.start,
                               c.seq.prompt_token_ids[c.start:c.start + c.length],
                               c.completes_prompt) for c in plan.prefills]
        chunks += [PrefillChunk(self.cache.row_of(s.id), s.num_cached,
                                [s.last_token_id, *drafts[s.id]], True,
                                len(drafts[s.id]) + 1, verify=True) for s in verifies]
        ids, positions = [s.last_token_id for s in decodes], [s.num_cached for s in decodes]
        if decodes and chunks:  # one pass: the weights are read once for the whole step
            logits = self.runner.decode_and_prefill(ids, positions, chunks)
        elif decodes:
            logits = self.runner.decode(ids, positions)
        else:
            logits = self.runner.prefill(chunks)
        for seq in decodes:
            seq.num_cached += 1
            self.cache.advance(seq.id, 1)
        for c in plan.prefills:
            c.seq.num_cached += c.length
            self.cache.advance(c.seq.id, c.length)
        self._remember_prompts(plan)
        sampled = decodes + [c.seq for c in plan.prefills if c.completes_prompt]
        sampled += [s for s in verifies for _ in range(len(drafts[s.id]) + 1)]
        return sampled, logits

    def _run_isolated(
        self, plan: SchedulerOutput,
    ) -> tuple[list[Sequence], torch.Tensor, list[RequestOutput]]:
        """Run each participant of a failed step alone; fail only those that fail alone.
        Hits not copied in yet are prefilled instead: a participant run alone inserts its
        prompt into the prefix cache, which may evict the blocks another one would copy."""
        for chunk in plan.prefills:
            if self._hits.pop(chunk.seq.id, None) is not None:
                self._prefill_hit(chunk)
        sampled: list[Sequence] = []
        rows: list[torch.Tensor] = []
        failed: list[RequestOutput] = []
        singles = [SchedulerOutput(decodes=[s]) for s in plan.decodes]
        singles += [SchedulerOutput(prefills=[c]) for c in plan.prefills]
        for single in singles:
            seq = single.decodes[0] if single.decodes else single.prefills[0].seq
            try:
                got, logits = self._run(single)
            except Exception as exc:
                log.warning("request %s fails on its own: %r", seq.id, exc)
                failed.append(self._fail(seq, f"inference failed: {type(exc).__name__}: {exc}"))
                continue
            sampled.extend(got)
            rows.extend(logits[i] for i in range(len(got)))
        logits = torch.stack(rows) if rows else torch.empty(0, device=self.runner.device)
        return sampled, logits, failed

    def _sample_isolated(
        self, seqs: list[Sequence], logits: torch.Tensor,
    ) -> tuple[list[Sampled], list[RequestOutput]]:
        """Sample every row in one pass; if that raises, row by row, failing only the rows
        that fail alone. The uniforms are drawn once, so the survivors' tokens are the ones
        the batch pass would have given."""
        uniforms: list[float | None] = []
        for seq in seqs:
            try:
                uniforms.append(self.sampler.draw([seq])[0])
            except Exception:
                log.exception("drawing a random number for request %s failed", seq.id)
                uniforms.append(None)
        masks = self._masks(seqs, logits)
        if None not in uniforms:
            try:
                drawn = [u for u in uniforms if u is not None]
                tokens, logprobs = self.sampler.sample_with_logprobs(logits, seqs, drawn, masks)
                return list(zip(seqs, tokens, logprobs, strict=True)), []
            except Exception:
                log.exception("sampling a batch of %d failed; retrying row by row", len(seqs))
        pairs: list[Sampled] = []
        failed: list[RequestOutput] = []
        for i, (seq, uniform) in enumerate(zip(seqs, uniforms, strict=True)):
            try:
                if uniform is None:
                    raise RuntimeError("could not draw from the request's generator")
                got, lps = self.sampler.sample_with_logprobs(
                    logits[i:i + 1], [seq], [uniform], None if masks is None else masks[i:i + 1])
                pairs.append((seq, got[0], lps[0]))
            except Exception as exc:
                log.warning("request %s fails sampling on its own: %r", seq.id, exc)
                failed.append(self._fail(seq, f"sampling failed: {type(exc).__name__}: {exc}"))
        return pairs, failed

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        detok = self.detoks.get(seq.id)
        delta = detok.take_delta(True) if detok else ""
        seq.error = error
        self._finish(seq, SequenceStatus.FINISHED_ERROR)
        return RequestOutput(id=seq.id, text_delta=delta, finished=True, finish_reason="error",
                             error=error, num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=seq.num_output_tokens)

    def _postprocess_safely(self, seq: Sequence, token: int,
                            logprobs: TokenLogprobs | None = None) -> RequestOutput:
        try:
            return self._postprocess(seq, token, logprobs)
        except Exception as exc:  # e.g. a tokenizer that cannot decode
            log.exception("post-processing request %s failed", seq.id)
            return self._fail(seq, f"post-processing failed: {type(exc).__name__}: {exc}")

    def _verified_safely(self, seq: Sequence,
                         run: list[tuple[int, TokenLogprobs | None]]) -> RequestOutput:
        try:
            return self._verified(seq, run)
        except Exception as exc:
            log.exception("post-processing request %s failed", seq.id)
            return self._fail(seq, f"post-processing failed: {type(exc).__name__}: {exc}")

    def _verified(self, seq: Sequence,
                  run: list[tuple[int, TokenLogprobs | None]]) -> RequestOutput:
        """Post-process a verified row's accepted run one token at a time, exactly as plain
        decode steps would (a stop, EOS or max_tokens inside the run ends it there), as one
        output."""
        merged: RequestOutput | None = None
        for token, logprobs in run:
            out = self._postprocess(seq, token, logprobs)
            if merged is None:
                merged = out
            else:
                merged.new_token_ids.extend(out.new_token_ids)
                merged.text_delta += out.text_delta
                merged.logprobs.extend(out.logprobs)
                merged.finished, merged.finish_reason = out.finished, out.finish_reason
                merged.num_output_tokens = out.num_output_tokens
            if out.finished:
                break
        assert merged is not None
        return merged

    def _postprocess(self, seq: Sequence, token: int,
                     logprobs: TokenLogprobs | None = None) -> RequestOutput:
        seq.append_token(token)
        if seq.matcher is not None and not seq.matcher.is_terminated() \
                and not seq.matcher.accept_token(token):
            raise GrammarError(f"token {token} does not fit the request's grammar")
        detok = self.detoks[seq.id]
        params = seq.params
        is_eos = token in self.eos and not params.ignore_eos
        is_text = not is_eos and token not in params.stop_token_ids
        if is_text:
            detok.add(token)
        status = SequenceStatus.RUNNING
        if is_eos or token in params.stop_token_ids or detok.stopped:
            status = SequenceStatus.FINISHED_STOPPED
        elif (seq.num_output_tokens >= params.max_tokens
              or seq.num_tokens >= self.runner.max_context):
            status = SequenceStatus.FINISHED_LENGTH
        if status.is_finished:
            self._finish(seq, status)
        return RequestOutput(
            id=seq.id, new_token_ids=[token], text_delta=detok.take_delta(status.is_finished),
            finished=status.is_finished, finish_reason=status.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            first_token=seq.num_output_tokens == 1,
            logprobs=([self._wire_logprobs(token, logprobs)]
                      if logprobs is not None and is_text else []),
        )

    def _wire_logprobs(self, token: int, logprobs: TokenLogprobs) -> list[Any]:
        """``[token text, logprob, [[text, logprob], ...]]`` (``RequestOutput.logprobs``)."""
        top = [[self._token_text(i), value] for i, value in logprobs.top]
        return [self._token_text(token), logprobs.logprob, top]

    def _token_text(self, token: int) -> str:
        return self.decoder.decode([token], skip_special_tokens=False)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq.id not in self.seqs:
            return
        seq.status = status
        self.scheduler.remove(seq)
        self.inflight.done(seq.id)
        self._hits.pop(seq.id, None)
        if seq.id in self.cache:
            self.cache.free(seq.id)
        self.speculator.forget(seq.id)
        del self.seqs[seq.id]
        self.detoks.pop(seq.id, None)

    def _apply_aborts(self) -> list[RequestOutput]:
        outputs = []
        for request_id in self._aborts:
            seq = self.seqs.get(request_id)
            if seq is None:
                continue
            detok = self.detoks[request_id]
            self._finish(seq, SequenceStatus.FINISHED_CANCELLED)
            outputs.append(RequestOutput(
                id=request_id, text_delta=detok.take_delta(True), finished=True,
                finish_reason="cancelled", num_prompt_tokens=seq.num_prompt_tokens,
                num_output_tokens=seq.num_output_tokens))
        self._aborts.clear()
        return outputs
