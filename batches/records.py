"""A batch's progress in Redis, written only through lease-fenced scripts.

- ``claim``: a line is about to be submitted: remember ``custom_id -> job id, offset`` in
  the in-flight hash and move the cursor past it (before the job is queued: a kill in
  between leaves an in-flight entry whose job does not exist, which is submitted again).
- ``record``: a line finished: store its output under its ``custom_id`` (once: a second
  record of the same id is a no-op), drop it from in-flight, count it, delete the job's
  keys. One script, so a kill can never count a line twice or lose it.
- ``drop``: a cancelled line leaves in-flight without a result.
Every script first checks the lease token and returns -1 if the caller lost it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from batches.lease import Lease, LeaseLost
from shared.keys import Keys

_FENCE = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end\n"

# KEYS: lease, batch. ARGV: token, field, value, field, value...
_SET_LUA = _FENCE + """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: lease, batch, inflight. ARGV: token, custom_id, entry, cursor offset, cursor line.
_CLAIM_LUA = _FENCE + """
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], 'cursor', ARGV[4], 'cursor_line', ARGV[5])
end
return 1
"""

# KEYS: lease, batch, inflight, results, job, job text, job events.
# ARGV: token, custom_id, job id ('' for a line that never became a job), result,
#       counter field, prompt tokens, completion tokens, cursor offset, cursor line.
_RECORD_LUA = _FENCE + """
local entry = redis.call('HGET', KEYS[3], ARGV[2])
if ARGV[3] ~= '' and entry and string.sub(entry, 1, #ARGV[3] + 1) ~= ARGV[3] .. ' ' then
  redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
  return 0
end
if redis.call('HSETNX', KEYS[4], ARGV[2], ARGV[4]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
  redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[6])
  redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[7])
end
redis.call('HDEL', KEYS[3], ARGV[2])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[2], 'cursor', ARGV[8], 'cursor_line', ARGV[9])
end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
return 1
"""

# KEYS: lease, inflight, job, job text, job events. ARGV: token, custom_id, job id.
_DROP_LUA = _FENCE + """
local entry = redis.call('HGET', KEYS[2], ARGV[2])
if entry and string.sub(entry, 1, #ARGV[3] + 1) == ARGV[3] .. ' ' then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return 1
"""


@dataclass(slots=True)
class InFlight:
    custom_id: str
    job_id: str
    offset: int  # where the line starts in the input file
    line: int

    def entry(self) -> str:
        return f"{self.job_id} {self.offset} {self.line}"

    @classmethod
    def parse(cls, custom_id: str, entry: str) -> InFlight:
        job_id, offset, line = entry.split(" ")
        return cls(custom_id, job_id, int(offset), int(line))


class Records:
    def __init__(self, redis: aioredis.Redis, keys: Keys, batch_id: str, lease: Lease) -> None:
        self.redis = redis
        self.keys = keys
        self.batch_id = batch_id
        self.lease = lease
        self.batch_key = keys.batch(batch_id)
        self.inflight_key = keys.batch_inflight(batch_id)
        self.results_key = keys.batch_results(batch_id)
        self._set = redis.register_script(_SET_LUA)
        self._claim = redis.register_script(_CLAIM_LUA)
        self._record = redis.register_script(_RECORD_LUA)
        self._drop = redis.register_script(_DROP_LUA)

    @staticmethod
    def _fenced(reply: object) -> int:
        if int(reply) == -1:  # type: ignore[call-overload]
            raise LeaseLost("the batch's lease was taken by another orchestrator")
        return int(reply)  # type: ignore[call-overload]

    async def set(self, **fields: str | int | float) -> None:
        args: list[str | int | float] = [self.lease.token]
        for name, value in fields.items():
            args += [name, value]
        self._fenced(await self._set(keys=[self.lease.key, self.batch_key], args=args))

    async def claim(self, item: InFlight, cursor: tuple[int, int] | None) -> None:
        offset, line = cursor if cursor is not None else ("", "")
        self._fenced(await self._claim(
            keys=[self.lease.key, self.batch_key, self.inflight_key],
            args=[self.lease.token, item.custom_id, item.entry(), offset, line]))

    async def record(self, custom_id: str, job_id: str, result: bytes, counter: str,
                     tokens: tuple[int, int] = (0, 0),
                     cursor: tuple[int, int] | None = None) -> bool:
        """Store a line's result once; ``False`` if the in-flight entry names another job."""
        job = job_id or "-"
        offset, line = cursor if cursor is not None else ("", "")
        reply = await self._record(
            keys=[self.lease.key, self.batch_key, self.inflight_key, self.results_key,
                  self.keys.job(job), self.keys.job_text(job), self.keys.job_events(job)],
            args=[self.lease.token, custom_id, job_id, result, counter, tokens[0], tokens[1],
                  offset, line])
        return self._fenced(reply) == 1

    async def drop(self, item: InFlight) -> None:
        job = item.job_id
        self._fenced(await self._drop(
            keys=[self.lease.key, self.inflight_key, self.keys.job(job),
                  self.keys.job_text(job), self.keys.job_events(job)],
            args=[self.lease.token, item.custom_id, job]))

    async def inflight(self) -> list[InFlight]:
        rows = await self.redis.hgetall(self.inflight_key)
        return [InFlight.parse(k.decode(), v.decode()) for k, v in rows.items()]
