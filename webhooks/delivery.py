"""One delivery attempt: resolve the URL's host, refuse non-public addresses (unless
allowed), and POST the signed body to the very address that was checked (so a DNS answer
that changes between the check and the connection cannot redirect it inside the network).
Redirects are not followed and proxies from the environment are not used. Success is any
2xx answer within the timeout; the answer's body is never read.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import httpx

from shared.webhook_url import WebhookTarget, WebhookUrlError, parse_webhook_url, resolve_target
from webhooks.events import WebhookEvent
from webhooks.signing import Signer


def make_client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_connections=256))


def pinned(target: WebhookTarget, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL with the host replaced by ``address``, the Host header, httpx extensions)."""
    parts = urlsplit(target.url)
    literal = f"[{address}]" if ":" in address else address
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host = f"[{target.host}]" if ":" in target.host else target.host
    headers = {"host": host if parts.port is None else f"{host}:{parts.port}"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return url, headers, extensions


async def deliver(client: httpx.AsyncClient, signer: Signer, event: WebhookEvent, *,
                  allow_private: bool, timeout_s: float) -> str | None:
    """POST ``event``; None when the receiver took it (2xx), else why not (one line)."""
    try:
        target = parse_webhook_url(event.url)
        addresses = await resolve_target(target, allow_private=allow_private)
    except WebhookUrlError as exc:
        return exc.message
    url, headers, extensions = pinned(target, addresses[0])
    headers.update(signer.headers(event.message_id, event.body, event.event))
    try:
        return await asyncio.wait_for(_post(client, url, headers, extensions, event.body),
                                      timeout_s)
    except asyncio.TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]


async def _post(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                extensions: dict[str, str], body: bytes) -> str | None:
    request = client.build_request("POST", url, content=body, headers=headers,
                                   extensions=extensions)
    response = await client.send(request, stream=True)
    try:
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
    finally:
        await response.aclose()
