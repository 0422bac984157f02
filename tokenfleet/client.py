"""A small Python client of the jobs API: submit once, wait politely, list.

```python
from tokenfleet.client import JobsClient

with JobsClient("http://127.0.0.1:8000", api_key=None) as client:
    job = client.submit({"messages": [{"role": "user", "content": "Hi"}]})
    done = client.wait(job["id"], on_update=lambda j: print(j["status"], j["queue_position"]))
    print(done["text"])
```

- ``submit`` sends an ``Idempotency-Key`` (a fresh UUID unless given) and retries a
  request that failed on the way (connection error, 429, 5xx) with the same key, so a
  retry never queues the job twice; the gateway's ``Retry-After`` sets the pause.
- ``wait`` polls ``GET /v1/jobs/{id}`` as often as its ``Retry-After`` says (about half the
  estimated start while queued, 1 s while running) and reports each poll to ``on_update``.
- ``list`` / ``iter_jobs`` page through ``GET /v1/jobs`` (newest first).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from shared.errors import TokenfleetError

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_POLL_S = 1.0
MAX_POLL_S = 30.0


class JobsClientError(TokenfleetError):
    """The gateway refused a request (the message is its error message) or is unreachable."""

    def __init__(self, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def retry_after_s(response: httpx.Response, default: float = DEFAULT_POLL_S) -> float:
    """The ``Retry-After`` header in seconds (``default`` without one), at most 30 s."""
    try:
        return min(max(float(response.headers["retry-after"]), 0.0), MAX_POLL_S)
    except (KeyError, ValueError):
        return default


class JobsClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout_s, transport=transport)
        self._sleep = sleep

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- submit -------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], *, idempotency_key: str | None = None,
               max_attempts: int = 5) -> dict[str, Any]:
        """Queue a job (``POST /v1/jobs``); retried with the same ``Idempotency-Key``, so it
        is queued at most once. The job's body (with ``idempotent_replay`` true when the
        gateway answered a retry of a request that had already queued it)."""
        key = idempotency_key or str(uuid.uuid4())
        headers = {"Idempotency-Key": key}
        for attempt in range(1, max_attempts + 1):
            try:
                response = self._http.post("/v1/jobs", json=body, headers=headers)
            except httpx.TransportError as exc:
                if attempt == max_attempts:
                    raise JobsClientError(f"the gateway is unreachable: {exc}") from exc
                self._sleep(min(2 ** (attempt - 1), MAX_POLL_S))
                continue
            if response.status_code in RETRY_STATUSES and attempt < max_attempts:
                self._sleep(retry_after_s(response, float(2 ** (attempt - 1))))
                continue
            job = self._json(response)
            job["idempotent_replay"] = response.headers.get("idempotent-replayed") == "true"
            return job
        raise AssertionError("unreachable")

    # --- read ---------------------------------------------------------------------------

    def status(self, job_id: str) -> tuple[dict[str, Any], float]:
        """The job now, and how many seconds the gateway suggests before asking again."""
        response = self._http.get(f"/v1/jobs/{job_id}")
        return self._json(response), retry_after_s(response)

    def wait(self, job_id: str, *, timeout_s: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job has finished (honouring ``Retry-After``); its final body.
        ``JobsClientError`` when ``timeout_s`` passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                job, pause = self.status(job_id)
            except httpx.TransportError as exc:  # a gateway restart: keep waiting
                job, pause = None, DEFAULT_POLL_S
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobsClientError(f"the gateway is unreachable: {exc}") from exc
            if job is not None:
                if on_update is not None:
                    on_update(job)
                if job["status"] in TERMINAL:
                    return job
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise JobsClientError(f"job {job_id} has not finished within "
                                          f"{timeout_s:g} s (status {job and job['status']})")
                pause = min(pause, left)
            self._sleep(pause)

    def list(self, *, after: str | None = None, limit: int = 20,
             status: str | None = None) -> dict[str, Any]:
        """One page of ``GET /v1/jobs``: ``{"data", "first_id", "last_id", "has_more"}``."""
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        if status is not None:
            params["status"] = status
        return self._json(self._http.get("/v1/jobs", params=params))

    def iter_jobs(self, *, status: str | None = None,
                  page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every job of the key, newest first."""
        after = None
        while True:
            page = self.list(after=after, limit=page_size, status=status)
            yield from page["data"]
            if not page["has_more"] or page["last_id"] is None:
                return
            after = page["last_id"]

    # --- change -------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.delete(f"/v1/jobs/{job_id}"))

    def purge(self, job_id: str) -> dict[str, Any]:
        """Remove a finished job's record and text now (``DELETE ...?purge=true``)."""
        return self._json(self._http.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}))

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {}
        if response.is_success:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:200]
        raise JobsClientError(f"HTTP {response.status_code}: {message}",
                              status=response.status_code, body=body)


def describe_progress(job: dict[str, Any]) -> str:
    """One line about where a job stands (for a progress display)."""
    status = job.get("status")
    if status == "queued":
        position = job.get("queue_position")
        eta = job.get("estimated_start_s")
        where = "" if position is None else f", {position} ahead"
        when = "" if eta is None else f", starts in ~{eta:g} s"
        return f"queued{where}{when}"
    if status == "running":
        return f"running, {len(job.get('text') or '')} characters so far"
    return str(status)
