"""The serving app's ASGI middlewares and its Host checks: which ``Host`` names are served
(DNS rebinding), the request body's size, and the access log (method, path, status, duration;
never a body). ``server/serving/service.py`` builds the app with them."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from fastapi import HTTPException
from fastapi.responses import JSONResponse

ACCESS_LOG = logging.getLogger("fedrec.access")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host names always served
WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # --host values meaning every interface


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host names served: :data:`LOCAL_HOSTS`, ``host`` unless it is a wildcard, and
    ``extra`` (``--allowed-hosts``; ``*.example.com`` for subdomains, ``*`` for any)."""
    bare_ipv6 = ":" in host and not host.startswith("[")
    given = [] if host in WILDCARD_HOSTS else [f"[{host}]" if bare_ipv6 else host]
    return list(dict.fromkeys(h.strip().lower() for h in [*LOCAL_HOSTS, *given, *extra]))


def host_list(text: str) -> list[str]:
    """``--allowed-hosts``: comma-separated names."""
    return [name for name in text.split(",") if name.strip()]


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower-cased, without its port (``[::1]:8000`` ->
    ``[::1]``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.partition(":")[0]


def host_allowed(name: str, hosts: Sequence[str]) -> bool:
    """Whether Host name ``name`` matches one of ``hosts`` (exact, ``*.suffix`` or ``*``)."""
    return bool(name) and any(
        pattern in ("*", name) or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in hosts
    )


def declared_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The request's ``Content-Length`` (None without one). ValueError unless each of its
    ``Content-Length`` headers holds the same decimal number (RFC 9110 section 8.6); a number
    of more digits than any body has is returned as ``sys.maxsize``."""
    values = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not all(value.isdigit() for value in values):
        raise ValueError("Content-Length must be one decimal number")
    digits = values.pop().lstrip(b"0") or b"0"
    return int(digits) if len(digits) < 19 else sys.maxsize


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (declared or streamed),
    400 for a ``Content-Length`` that is not one decimal number."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            declared = declared_length(scope["headers"])
        except ValueError as error:
            return await JSONResponse({"detail": str(error)}, 400)(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, 413)
        if declared is not None and declared > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)


class TrustedHosts:
    """ASGI middleware: 400 for a request whose ``Host`` is not served (a DNS-rebinding page
    reaching a local service through a name of its own gets this)."""

    def __init__(self, app, hosts: Sequence[str]):
        self.app, self.hosts = app, list(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        name = host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
        if not host_allowed(name, self.hosts):
            refused = JSONResponse(
                {"detail": f"host {name!r} is not served here (see --allowed-hosts)"}, 400
            )
            return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


class AccessLog:
    """ASGI middleware: one ``fedrec.access`` record per request: method, path, status and
    duration (the path only: bodies, histories and queries are never logged)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recorded(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            ACCESS_LOG.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status,
                1000 * (time.perf_counter() - started),
            )


def log_access(enabled: bool) -> None:
    """Print the access log on stderr (``fedrec serve``'s default), or silence it."""
    ACCESS_LOG.setLevel(logging.INFO if enabled else logging.WARNING)
    if enabled and not ACCESS_LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        ACCESS_LOG.addHandler(handler)
