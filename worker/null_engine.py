"""An engine with no model: each request gets a fixed number of dummy words, one per step.

Used by the queue-loop tests and the "bus" benchmark (``TOKENFLEET_ENGINE=null``), where
the point is to measure Redis/gateway overhead without any torch work. ``null_model_info``
publishes a small but real byte-level tokenizer so a gateway can tokenize against it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from shared.model_info import ModelInfo
from worker.engine.types import EngineRequest, EngineStats, RequestOutput

WORDS: tuple[str, ...] = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)
NUM_BYTE_TOKENS = 256
IM_START_ID = 256
IM_END_ID = 257
FIRST_WORD_ID = 258  # WORDS[i] is token FIRST_WORD_ID + i and decodes to " " + WORDS[i]
NULL_MAX_CONTEXT = 2048
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ADMISSION_HISTORY = 1024  # admission batches the null engine remembers (for tests)


def word_token(index: int) -> tuple[int, str]:
    """The token id and text the null engine emits as a request's ``index``-th token."""
    slot = index % len(WORDS)
    return FIRST_WORD_ID + slot, " " + WORDS[slot]


@dataclass(slots=True)
class _NullSequence:
    request: EngineRequest
    num_target_tokens: int
    num_output_tokens: int = 0
    is_aborted: bool = False


class NullEngine:
    """Implements ``worker.engine.types.Engine`` without a model.

    ``admissions`` records, at each step, the ids added since the previous step, so tests
    can check that requests read in one coalescing window reached the engine together;
    ``idle_releases`` counts the queue loop's ``release_idle_memory`` calls made while it
    held no request (the real engine then gives its KV buffers back).
    """

    def __init__(self, max_batch_size: int, num_tokens: int, step_delay_s: float = 0.0, *,
                 kv_tokens_budget: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.num_tokens = num_tokens
        self.step_delay_s = step_delay_s  # simulated compute per step
        self.kv_tokens_budget = kv_tokens_budget  # reported only: the null engine has no cache
        self.admissions: deque[list[str]] = deque(maxlen=ADMISSION_HISTORY)
        self.idle_releases = 0
        self._running: dict[str, _NullSequence] = {}
        self._added_since_step: list[str] = []
        self._num_steps = 0

    def add_request(self, request: EngineRequest) -> None:
        if request.id in self._running:
            raise ValueError(f"request {request.id!r} is already in the engine")
        target = min(request.params.max_tokens, self.num_tokens)
        self._running[request.id] = _NullSequence(request, num_target_tokens=target)
        self._added_since_step.append(request.id)

    def abort_request(self, request_id: str) -> None:
        seq = self._running.get(request_id)
        if seq is not None:
            seq.is_aborted = True

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def num_free_slots(self) -> int:
        return self.max_batch_size - len(self._running)

    def release_idle_memory(self) -> None:
        """Nothing is kept between batches: only counted."""
        if not self._running:
            self.idle_releases += 1

    def step(self) -> list[RequestOutput]:
        if self._added_since_step:
            self.admissions.append(self._added_since_step)
            self._added_since_step = []
        if self.step_delay_s > 0 and self._running:
            time.sleep(self.step_delay_s)
        self._num_steps += 1
        outputs = [self._advance(seq) for seq in self._running.values()]
        for out in outputs:
            if out.finished:
                del self._running[out.id]
        return outputs

    def stats(self) -> EngineStats:
        kv_used = sum(len(seq.request.prompt_token_ids) + seq.num_output_tokens
                      for seq in self._running.values())
        return EngineStats(num_running=len(self._running), kv_tokens_used=kv_used,
                           kv_tokens_budget=self.kv_tokens_budget, steps=self._num_steps)

    def _advance(self, seq: _NullSequence) -> RequestOutput:
        num_prompt = len(seq.request.prompt_token_ids)
        if seq.is_aborted:
            return RequestOutput(
                id=seq.request.id, finished=True, finish_reason="cancelled",
                num_prompt_tokens=num_prompt, num_output_tokens=seq.num_output_tokens,
            )
        token_id, text = word_token(seq.num_output_tokens)
        seq.num_output_tokens += 1
        finished = seq.num_output_tokens >= seq.num_target_tokens
        return RequestOutput(
            id=seq.request.id, new_token_ids=[token_id], text_delta=text, finished=finished,
            finish_reason="length" if finished else None, num_prompt_tokens=num_prompt,
            num_output_tokens=seq.num_output_tokens, first_token=seq.num_output_tokens == 1,
        )


# --- the null model's tokenizer ------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel expects)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for byte in range(NUM_BYTE_TOKENS):
        if byte not in mapping:
            mapping[byte] = chr(NUM_BYTE_TOKENS + extra)
            extra += 1
    return mapping


def build_null_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is a token; plus ChatML specials and words."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(NUM_BYTE_TOKENS)}
    vocab["<|im_start|>"] = IM_START_ID
    vocab["<|im_end|>"] = IM_END_ID
    space = byte_chars[ord(" ")]
    for index, word in enumerate(WORDS):
        vocab[space + word] = FIRST_WORD_ID + index  # decodable, never produced by encode
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([
        AddedToken("<|im_start|>", special=True, normalized=False),
        AddedToken("<|im_end|>", special=True, normalized=False),
    ])
    return tokenizer


def null_model_info(name: str, max_batch_tokens: int = 0) -> ModelInfo:
    """The null model's info; ``max_batch_tokens``: the worker's KV budget (0: unknown)."""
    tokenizer = build_null_tokenizer()
    return ModelInfo(
        name=name,
        max_context=NULL_MAX_CONTEXT,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        tokenizer_json=tokenizer.to_str().encode(),
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        eos_token_ids=[IM_END_ID],
        quantization="none",
        dtype="none",
        max_batch_tokens=max_batch_tokens,
    )
