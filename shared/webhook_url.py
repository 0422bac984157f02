"""Which webhook URLs tokenfleet will call: the SSRF guard of the gateway and the dispatcher.

A webhook URL must be ``http`` or ``https`` with a host, and every address its host resolves
to must be globally routable (``ipaddress``'s ``is_global``: not loopback, private,
link-local, CGNAT, multicast, reserved or unspecified; an IPv4-mapped IPv6 address is judged
by its IPv4 address), unless ``TOKENFLEET_WEBHOOK_ALLOW_PRIVATE=true``. The gateway checks
at submission (400); the dispatcher resolves again at each delivery and connects to the
address it checked, so a name that later resolves to an internal address (DNS rebinding) is
refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import InvalidRequestError

MAX_URL_LENGTH = 2048
SCHEMES: dict[str, int] = {"http": 80, "https": 443}
PARAM = "webhook"


class WebhookUrlError(InvalidRequestError):
    """A webhook URL tokenfleet refuses to call (400 at submission)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param=PARAM, code="invalid_webhook")


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    scheme: str
    host: str  # without brackets for IPv6
    port: int


def parse_webhook_url(url: str) -> WebhookTarget:
    """The URL's parts; ``WebhookUrlError`` for a scheme other than http(s) or no host."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"webhook is not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookUrlError(f"webhook URL scheme must be http or https, not {scheme!r}")
    if not parts.hostname:
        raise WebhookUrlError("webhook URL has no host; give an absolute URL, "
                              "e.g. https://example.com/hooks/tokenfleet")
    return WebhookTarget(url=url, scheme=scheme, host=parts.hostname,
                         port=port or SCHEMES[scheme])


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_target(target: WebhookTarget, *, allow_private: bool) -> list[str]:
    """The addresses to connect to, all allowed; ``WebhookUrlError`` if none or any not."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError(f"webhook host {target.host!r} does not resolve: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookUrlError(f"webhook host {target.host!r} has no address")
    if not allow_private:
        refused = [address for address in addresses if not is_public_address(address)]
        if refused:
            raise WebhookUrlError(
                f"webhook host {target.host!r} resolves to a non-public address "
                f"({refused[0]}: loopback, private, link-local or reserved); webhooks go "
                "only to public hosts unless the server sets "
                "TOKENFLEET_WEBHOOK_ALLOW_PRIVATE=true")
    return addresses


async def check_webhook_url(url: str, *, allow_private: bool) -> WebhookTarget:
    """At submission: the URL's form and, unless private hosts are allowed, its addresses."""
    target = parse_webhook_url(url)
    if not allow_private:
        await resolve_target(target, allow_private=False)
    return target
