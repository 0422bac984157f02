"""A small HTTP client of the gateway's Files and Batch APIs (what ``tokenfleet enqueue``
and ``tokenfleet batch`` use), plus the local check of an input file before upload."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from batches.input import ENDPOINTS, LineError, LineSplitter, is_blank, parse_line
from shared.errors import TokenfleetError

FINAL = frozenset({"completed", "failed", "cancelled", "expired"})


class ClientError(TokenfleetError):
    """The gateway refused a request or could not be reached; the message says why."""


@dataclass(slots=True)
class LocalCheck:
    num_lines: int
    endpoint: str
    errors: list[LineError]


def _file_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    splitter = LineSplitter(0, 1 << 24)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            yield from splitter.feed(chunk)
    yield from splitter.finish()


def check_file(path: Path, max_errors: int = 20) -> LocalCheck:
    """The envelope of every line (JSON, custom_id unique, method, url): the part that needs
    no model. Bodies are checked by the fleet before anything runs."""
    seen: set[str] = set()
    errors: list[LineError] = []
    endpoint: str | None = None
    num_lines = 0
    for number, (offset, raw) in enumerate(_file_lines(path), start=1):
        if is_blank(raw):
            continue
        num_lines += 1
        try:
            line = parse_line(raw, number, offset, endpoint)
        except LineError as error:
            errors.append(error)
        else:
            endpoint = endpoint or line.url
            if line.custom_id in seen:
                errors.append(LineError(number, "duplicate_custom_id",
                                        f"custom_id {line.custom_id!r} is used by an earlier "
                                        "line", "custom_id"))
            seen.add(line.custom_id)
        if len(errors) >= max_errors:
            break
    if num_lines == 0 and not errors:
        errors.append(LineError(0, "empty_file", "the file has no request lines"))
    return LocalCheck(num_lines, endpoint or ENDPOINTS[0], errors)


class GatewayClient:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the gateway at {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ClientError(f"{method} {path}: HTTP {response.status_code}: {message}")
        return response

    def upload(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/jsonl")}
            result: dict[str, Any] = self._call("POST", "/v1/files", files=files,
                                                data={"purpose": "batch"}).json()
            return result

    def create_batch(self, file_id: str, endpoint: str,
                     metadata: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                "metadata": metadata}
        result: dict[str, Any] = self._call("POST", "/v1/batches", json=body).json()
        return result

    def batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/batches/{batch_id}").json()
        return result

    def cancel(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/batches/{batch_id}/cancel").json()
        return result

    def list_batches(self, limit: int) -> list[dict[str, Any]]:
        page = self._call("GET", "/v1/batches", params={"limit": limit}).json()
        return list(page["data"])

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file to ``dest``; the number of bytes written."""
        written = 0
        with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError(f"GET /v1/files/{file_id}/content: HTTP "
                                  f"{response.status_code}: {response.text[:300]}")
            with dest.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    written += len(chunk)
        return written

    def wait(self, batch_id: str, poll_s: float = 1.0,
             on_update: Any = None) -> dict[str, Any]:
        """Poll until the batch reaches a final status; ``on_update(batch)`` after each poll."""
        while True:
            batch = self.batch(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch["status"] in FINAL:
                return batch
            time.sleep(poll_s)
