"""Where a queued job stands: ``queue_position``, ``estimated_start_s``, and ``Retry-After``.

Bounded work per poll, whatever the queue's length: one script that reads, per lane of the
job's model, ``XINFO GROUPS`` (the group's ``lag``: entries not yet delivered to a worker;
O(1) per group) and the lane's counter (``Keys.queue_added``, kept equal to the stream's
``entries-added`` by ``ENQUEUE_LUA``). A job stores its own number in its lane
(``queue_seq``), so the entries after it are ``counter - queue_seq`` and the entries before
it still waiting are ``lag - (counter - queue_seq) - 1``. Lanes are read interactive first,
so a batch job also has every waiting interactive request of its model ahead of it. Nothing
ever walks the stream (``XRANGE`` counting would be O(n)). Entries ahead that were
cancelled while queued still count until a worker skips them, which takes it no time.

The ETA comes from the fleet's measured dequeue rate: the same script keeps, per model, an
exponentially weighted rate of entries delivered to workers (``Keys.queue_rate``), updated
at most once a second from whichever poll comes by, and only over intervals where work was
waiting or moving (an idle fleet says nothing about its speed). ``estimated_start_s`` is
``(queue_position + 1) / rate``, null until a rate is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.tasks import cancel_and_wait
from shared.job_record import STATUS_QUEUED, STATUS_RUNNING, JobField, JobRecord, str_field
from shared.keys import LANES, WORKER_GROUP, Keys

RATE_TAU_S = 30.0  # time constant of the rate's exponential average
RATE_MIN_INTERVAL_S = 1.0  # at most one rate sample per model per this
RATE_MAX_GAP_S = 60.0  # a longer gap between samples restarts the measurement
RATE_TTL_S = 86_400
QUEUED_UPDATE_S = 1.0  # how often a job stream re-checks the position of a queued job
FIRST_UPDATE_S = 0.05  # the first ``event: queued`` waits this long for the stream's opening
CANCEL_WAIT_S = 5.0

# KEYS: per lane in LANES order: request stream, lane counter; then the model's rate hash.
# ARGV: 1 group, 2 the job's lane index (1-based), 3 its queue_seq, 4 rate tau (s),
#       5 min sample interval (s), 6 max gap (s), 7 rate ttl (s).
# Returns {position, 1 if a worker already holds it else 0, rate as a string ("" unknown)}.
QUEUE_POSITION_LUA = """
local num_lanes = (#KEYS - 1) / 2
local mine = tonumber(ARGV[2])
local position, held, total_read, total_waiting = 0, 0, 0, 0
for i = 1, num_lanes do
  local stream, added = KEYS[2 * i - 1], tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local lag, entries_read = nil, nil
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if ok then
    for _, g in ipairs(groups) do
      local info = {}
      for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
      if info['name'] == ARGV[1] then
        lag, entries_read = info['lag'], info['entries-read']  -- false when unknown
      end
    end
  end
  local waiting
  if lag then waiting = tonumber(lag)
  elseif entries_read then waiting = added - tonumber(entries_read)
  else waiting = redis.call('XLEN', stream) end  -- no group yet: nothing was delivered
  if waiting < 0 then waiting = 0 end
  total_waiting = total_waiting + waiting
  total_read = total_read + math.max(added - waiting, 0)
  if i < mine then
    position = position + waiting
  elseif i == mine then
    local ahead = math.min(waiting - (added - tonumber(ARGV[3])) - 1, waiting - 1)
    if ahead < 0 then held = 1 else position = position + ahead end
  end
end
if held == 1 then position = 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local key = KEYS[#KEYS]
local last = redis.call('HMGET', key, 't', 'n', 'rate')
local rate = last[3]
if not last[1] then
  redis.call('HSET', key, 't', tostring(now), 'n', total_read)
elseif now - tonumber(last[1]) >= tonumber(ARGV[5]) then
  local dt, dn = now - tonumber(last[1]), total_read - tonumber(last[2])
  if dt <= tonumber(ARGV[6]) and dn >= 0 and (dn > 0 or total_waiting > 0) then
    local sample = dn / dt
    if rate then
      local w = 1 - math.exp(-dt / tonumber(ARGV[4]))
      sample = tonumber(rate) + w * (sample - tonumber(rate))
    end
    rate = tostring(sample)
    redis.call('HSET', key, 'rate', rate)
  end
  redis.call('HSET', key, 't', tostring(now), 'n', total_read)
end
redis.call('EXPIRE', key, ARGV[7])
return {position, held, rate or ''}
"""


@dataclass(frozen=True, slots=True)
class QueueEstimate:
    position: int
    estimated_start_s: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"queue_position": self.position, "estimated_start_s": self.estimated_start_s}


async def estimate(redis: aioredis.Redis, keys: Keys, model: str, lane: str,
                   queue_seq: int) -> QueueEstimate:
    """Position and ETA of the entry numbered ``queue_seq`` in ``model``'s ``lane``."""
    lane_index = LANES.index(lane) + 1 if lane in LANES else len(LANES)
    script_keys = [name for each in LANES for name in
                   (keys.requests_stream(model, each), keys.queue_added(model, each))]
    script = redis.register_script(QUEUE_POSITION_LUA)
    position, _held, raw_rate = await script(
        keys=[*script_keys, keys.queue_rate(model)],
        args=[WORKER_GROUP, lane_index, queue_seq, RATE_TAU_S, RATE_MIN_INTERVAL_S,
              RATE_MAX_GAP_S, RATE_TTL_S])
    rate = float(raw_rate) if raw_rate else 0.0
    eta = round((int(position) + 1) / rate, 1) if rate > 0 else None
    return QueueEstimate(position=int(position), estimated_start_s=eta)


async def estimate_for(redis: aioredis.Redis, keys: Keys,
                       fields: dict[bytes, bytes]) -> QueueEstimate | None:
    """The estimate of a job from its hash; None unless it is queued."""
    record = JobRecord.from_hash(fields)
    if record.status != STATUS_QUEUED or record.model is None or record.queue_seq is None:
        return None
    return await estimate(redis, keys, record.model, record.lane or LANES[0], record.queue_seq)


def retry_after_s(status: str | None, found: QueueEstimate | None) -> int | None:
    """How soon a poll of a job is worth repeating: about half its ETA when queued (1 to 30
    s; 2 while the ETA is unknown), 1 s while running, never once it has finished."""
    if status == STATUS_RUNNING:
        return 1
    if status != STATUS_QUEUED:
        return None
    if found is None or found.estimated_start_s is None:
        return 2
    return min(max(math.ceil(found.estimated_start_s / 2), 1), 30)


def sse_queued(found: QueueEstimate) -> bytes:
    """``event: queued`` (no ``id:``, so a reconnect still resumes after the last token)."""
    data = json.dumps(found.as_dict(), separators=(",", ":"))
    return f"event: queued\ndata: {data}\n\n".encode()


def job_estimator(redis: aioredis.Redis, keys: Keys,
                  job_id: str) -> Callable[[], Awaitable[QueueEstimate | None]]:
    """A function giving the job's current estimate (None once it is no longer queued)."""
    names = [JobField.STATUS, JobField.MODEL, JobField.LANE, JobField.QUEUE_SEQ]

    async def current() -> QueueEstimate | None:
        values = await redis.hmget(keys.job(job_id), [str(name) for name in names])
        fields = {name.encode(): value for name, value in zip(names, values, strict=True)
                  if value is not None}
        if str_field(fields, JobField.STATUS) != STATUS_QUEUED:
            return None
        return await estimate_for(redis, keys, fields)

    return current


async def with_queue_updates(body: AsyncGenerator[bytes, None],
                             current: Callable[[], Awaitable[QueueEstimate | None]],
                             interval_s: float = QUEUED_UPDATE_S,
                             ) -> AsyncGenerator[bytes, None]:
    """``body``, with an ``event: queued`` soon after it opens (it may precede the chat role
    chunk, which goes out with the first tokens) and whenever the position (or the ETA, in
    whole seconds) changes, checked every ``interval_s`` while the job is queued."""
    found = await current()
    shown: tuple[int, int | None] | None = None
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(body))
            timeout = None
            if found is not None:
                timeout = FIRST_UPDATE_S if shown is None else interval_s
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if done:
                task, pending = pending, None
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    return
                yield chunk
            else:
                found = await current()
            if found is not None and _shown(found) != shown:
                shown = _shown(found)
                yield sse_queued(found)
    finally:
        if pending is not None:
            await cancel_and_wait(pending, CANCEL_WAIT_S)
            if not pending.cancelled():
                with contextlib.suppress(BaseException):
                    pending.result()
        await body.aclose()


def _shown(found: QueueEstimate | None) -> tuple[int, int | None] | None:
    if found is None:
        return None
    eta = found.estimated_start_s
    return found.position, None if eta is None else int(eta)


async def _next(body: AsyncGenerator[bytes, None]) -> bytes:
    return await anext(body)
