"""Test support: a tiny model description and a fake worker that speaks the wire protocol.

The fake worker does what a real one does on Redis (job hash, text, event list, pub/sub
batches, heartbeat) without a model, so gateway tests and demos run in milliseconds.
Directives in the prompt change its behaviour: ``FAIL`` (error event), ``RESTART`` (one
restart mid-answer), ``STALL`` (never answers), ``SLOW`` (50 ms per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.exceptions import RedisError
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from gateway.app import create_app
from gateway.tasks import cancel_and_wait, failure
from shared.keys import LANES, Keys
from shared.model_info import ModelInfo
from shared.protocol import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_RESTART,
    EVENT_START,
    EVENT_TOKEN,
    GenerateRequest,
    TokenEvent,
    pack,
    pack_events,
    unpack_request,
)
from shared.settings import Settings

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the conversation must not start with an assistant message') }}"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer_json() -> bytes:
    """A byte-level BPE with no merges: one token per byte, plus three special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return tokenizer.to_str().encode()


def tiny_model_info(name: str = "tiny", max_context: int = 256,
                    chat_template: str = CHAT_TEMPLATE) -> ModelInfo:
    return ModelInfo(name=name, max_context=max_context, vocab_size=256 + len(SPECIAL_TOKENS),
                     tokenizer_json=tiny_tokenizer_json(), chat_template=chat_template,
                     bos_token="<|endoftext|>", eos_token="<|im_end|>",
                     eos_token_ids=[258], add_bos_token=False)


@dataclass
class FakeWorker:
    redis: aioredis.Redis
    keys: Keys
    info: ModelInfo
    worker_id: str = "fake-worker-1"
    reply: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    warm: bool = True
    publish: bool = True  # False: events reach the list only (a lost pub/sub message)
    served: list[str] = field(default_factory=list)  # request ids handled, in order

    def __post_init__(self) -> None:
        self._tokenizer = Tokenizer.from_str(self.info.tokenizer_json.decode())
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = False

    async def register(self) -> None:
        """Publish the model info and one heartbeat."""
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.model_info(self.info.name), mapping=self.info.to_mapping())
            pipe.zadd(self.keys.workers, {self.worker_id: now})
            pipe.hset(self.keys.worker(self.worker_id), mapping={
                "id": self.worker_id, "model": self.info.name, "quantization": "none",
                "dtype": "float32", "batch_size": "8", "warm": "1" if self.warm else "0",
                "started_at": repr(now)})
            pipe.expire(self.keys.worker(self.worker_id), 30)
            await pipe.execute()

    async def run(self) -> None:
        streams = {self.keys.requests_stream(self.info.name, lane): "0" for lane in LANES}
        while not self.stopped:
            replies = await self.redis.xread(streams, block=50, count=16)  # type: ignore[arg-type]
            for stream, entries in replies or []:
                for entry_id, fields in entries:
                    streams[stream.decode()] = entry_id.decode()
                    request = unpack_request(fields[b"m"])
                    task = asyncio.create_task(self.handle(request))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def handle(self, request: GenerateRequest) -> None:
        job = self.keys.job(request.id)
        if await self.redis.get(self.keys.cancel(request.id)):
            await self.redis.hset(job, mapping={"status": "cancelled",
                                                "finish_reason": "cancelled"})
            return
        self.served.append(request.id)
        prompt = self._tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False)
        if "STALL" in prompt:
            return
        delay = 0.05 if "SLOW" in prompt else 0.0
        await self.redis.hset(job, mapping={"status": "running", "started_at": repr(time.time()),
                                            "worker": self.worker_id})
        seq = 0
        await self._emit(request, TokenEvent(request.id, seq, EVENT_START))
        words = self.reply[: request.params.max_tokens]
        if "RESTART" in prompt:
            seq += 1
            await self._emit(request, TokenEvent(request.id, seq, EVENT_TOKEN, text="partial"))
            seq += 1
            await self.redis.delete(self.keys.job_text(request.id))
            await self._emit(request, TokenEvent(request.id, seq, EVENT_RESTART))
        if "FAIL" in prompt:
            await self._finish(request, TokenEvent(request.id, seq + 1, EVENT_ERROR,
                                                   error="the fake model failed"), "failed")
            return
        for i, word in enumerate(words):
            await asyncio.sleep(delay)
            if await self.redis.get(self.keys.cancel(request.id)):
                done = TokenEvent(request.id, seq + 1, EVENT_DONE, finish_reason="cancelled",
                                  prompt_tokens=len(request.prompt_token_ids),
                                  completion_tokens=i)
                await self._finish(request, done, "cancelled")
                return
            seq += 1
            await self._emit(request, TokenEvent(request.id, seq, EVENT_TOKEN, text=word,
                                                 token_ids=[i]))
        reason = "length" if len(self.reply) > request.params.max_tokens else "stop"
        done = TokenEvent(request.id, seq + 1, EVENT_DONE, finish_reason=reason,
                          prompt_tokens=len(request.prompt_token_ids),
                          completion_tokens=len(words))
        await self._finish(request, done, "succeeded")

    async def _emit(self, request: GenerateRequest, event: TokenEvent) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.keys.job_events(request.id), pack(event))
            if event.text:
                pipe.append(self.keys.job_text(request.id), event.text.encode())
            if request.reply_channel and self.publish:
                pipe.publish(request.reply_channel, pack_events([event]))
            await pipe.execute()

    async def _finish(self, request: GenerateRequest, event: TokenEvent, status: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self.keys.job_events(request.id), pack(event))
            pipe.hset(self.keys.job(request.id), mapping={
                "status": status, "finished_at": repr(time.time()),
                "first_token_at": repr(time.time()),
                "completion_tokens": str(event.completion_tokens),
                "finish_reason": event.finish_reason or "", "error": event.error or ""})
            if request.reply_channel and self.publish:
                pipe.publish(request.reply_channel, pack_events([event]))
            await pipe.execute()


@contextlib.asynccontextmanager
async def running_worker(worker: FakeWorker) -> AsyncIterator[FakeWorker]:
    """Register ``worker`` and serve requests until the block ends."""
    await worker.register()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        # A cancel can be lost inside redis-py on Python < 3.12 (see gateway.tasks), so the
        # loop also checks a flag and the cancel is repeated until the task is done.
        worker.stopped = True
        for handler in list(worker._tasks):
            if await cancel_and_wait(handler, timeout_s=5):
                failure(handler)  # retrieved: a handler's error is not the test's concern
        await cancel_and_wait(task, timeout_s=5)
        if not task.done():
            raise RuntimeError("the fake worker did not stop within 5 s")
        error = failure(task)
        if error is not None and not isinstance(error, RedisError):  # Redis stopped by a test
            raise error


@contextlib.asynccontextmanager
async def gateway_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app in-process (lifespan run explicitly) and an HTTP client bound to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app


def parse_sse(body: str) -> list[tuple[str | None, str]]:
    """``(event name or None, data)`` for each event of a ``text/event-stream`` body."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((name, "\n".join(data)))
    return events
