"""``fedrec gateway``: the SuperLink's public face, its Fleet API and nothing else.

flwr 1.42 serves the Fleet API (what SuperNodes call), the Control API (the ``flwr`` CLI:
register node keys, start runs, list nodes; no login in the open-source build) and the Runtime
API on one HTTPS port. The SuperLink therefore listens on loopback only, and this gateway on
the address the merchants dial: it terminates TLS with the SuperLink's certificate, forwards
the calls a SuperNode makes (``POST /v1/fleet/<call>``, those of
``flwr/supernode/fleet_http_client.py``) to the SuperLink over TLS verified with the
federation's CA, and answers anything else 403 without forwarding it. Request bodies are
bounded (``--max-body-mb``) and must arrive within ``--body-timeout``; so are the bytes of all
the bodies held at once (``--max-buffered-mb``: beyond it a request is answered 503, which a
SuperNode retries), since a body is held whole until the SuperLink has answered it: without
that bound a thousand connections, each sending a body just under the limit and stalling,
held 64 GB. Responses (a FAB, model weights) are streamed back as they come.

The calls that store a node's reply (``push-messages``, ``push-object``) reach the SuperLink one
at a time, and one the SuperLink answers 500 is sent again (``WRITE_RETRIES``). flwr 1.42's
SuperLink keeps its state in SQLite, which waits 5 s for a write lock and then fails the call
with a 500 the SuperNode does not retry: ten Amazon Beauty-sized replies (about 11 chunks of
5 MiB each) arriving at once on a busy machine lost half of them. Sending them again is safe:
an object is stored under the hash of its content (a second store of it changes nothing), and
the SuperLink takes a reply it already holds as the same reply (its idempotent retry).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# every call of flwr 1.42's FleetHttpClient (flwr/supernode/fleet_http_client.py), all POST
FLEET_CALLS = frozenset(
    f"/v1/fleet/{call}".encode()
    for call in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Flower sends model weights in chunks of 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
MAX_BODY_MB = 64
# the bytes of every request body held at once (the most bodies of MAX_BODY_MB: 16; of Flower's
# chunks: 200)
MAX_BUFFERED_MB = 1024
# headers of one connection, not of the message (RFC 9110 section 7.6.1)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}  # httpx sets them for the SuperLink
# the calls that write a node's reply into the SuperLink's state
WRITES = frozenset({b"/v1/fleet/push-messages", b"/v1/fleet/push-object"})
# a write answered 500 is sent again after each of these pauses (seconds)
WRITE_RETRIES = (1.0, 3.0, 9.0)
log = logging.getLogger("fedrec.gateway")


class GatewayBusy(Exception):
    """The request bodies held at once would pass the gateway's ``max_buffered``."""


class FleetGateway:
    """An ASGI application forwarding the Fleet API to ``superlink`` (``https://host:port``,
    its certificate verified with ``ca``) and refusing everything else."""

    def __init__(
        self,
        superlink: str,
        ca: Path,
        max_body: int = MAX_BODY_MB << 20,
        body_timeout: float = 60.0,
        timeout: float = 120.0,
        write_retries: tuple[float, ...] = WRITE_RETRIES,
        max_buffered: int = MAX_BUFFERED_MB << 20,
    ):
        self.max_body, self.max_buffered = max_body, max_buffered
        self.buffered = 0  # the bytes of the request bodies held now
        self.write_retries = write_retries
        self.body_timeout = body_timeout
        self.forwarded = self.refused = self.retried = 0  # logged at shutdown
        self.writing = asyncio.Lock()  # one reply written into the SuperLink at a time
        self.client = httpx.AsyncClient(
            base_url=superlink,
            verify=ssl.create_default_context(cafile=str(ca)),
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info(
                    "forwarded %d Fleet calls (%d writes sent again), refused %d",
                    self.forwarded,
                    self.retried,
                    self.refused,
                )
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        if scope["method"] != "POST" or path not in FLEET_CALLS or scope["query_string"]:
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %r from %s", scope["method"], path, client[0])
            await self._refuse(send, 403, "only the Fleet API is served here")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in NOT_FORWARDED]
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            await self._refuse(send, 413, f"request body over {self.max_body} bytes")
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._body(receive)
        except TimeoutError:
            await self._refuse(send, 408, f"request body not received in {self.body_timeout:g} s")
            return
        except OverflowError:
            await self._refuse(send, 413, f"request body over {self.max_body} bytes")
            return
        except GatewayBusy:
            await self._refuse(send, 503, "the gateway holds too many request bodies; retry")
            return
        except EOFError:  # the client left mid-body: nothing to forward, no one to answer
            return
        try:
            await self._forward(path.decode(), headers, body, send, write=path in WRITES)
        finally:
            self.buffered -= len(body)

    async def _refuse(self, send: Send, status: int, text: str) -> None:
        self.refused += 1
        await _answer(send, status, text)

    async def _body(self, receive: Receive) -> bytes:
        """The request body, counted in :attr:`buffered` (the caller takes it off once the body
        is let go); OverflowError when it is larger than allowed, :class:`GatewayBusy` when the
        bodies held at once would pass ``max_buffered``, EOFError when the client disconnects
        first (each counted off)."""
        body = bytearray()
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise EOFError
                chunk = message.get("body", b"")
                body += chunk
                self.buffered += len(chunk)
                if len(body) > self.max_body:
                    raise OverflowError
                if self.buffered > self.max_buffered:
                    raise GatewayBusy
                if not message.get("more_body", False):
                    return bytes(body)
        except BaseException:  # a refusal, a disconnection, the body timeout's cancellation
            self.buffered -= len(body)
            raise

    async def _forward(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: Send,
        write: bool = False,
    ) -> None:
        """Send the call to the SuperLink and stream its answer back. A ``write`` reaches it
        under the write lock, one at a time, and one answered 500 is sent again after each
        pause of ``write_retries`` (the lock is not held while waiting: a node whose calls
        keep failing delays no one); the last answer goes back."""
        retries = self.write_retries if write else ()
        try:
            for pause in (*retries, None):
                request = self.client.build_request("POST", path, headers=headers, content=body)
                async with self.writing if write else contextlib.nullcontext():
                    response = await self.client.send(request, stream=True)
                if response.status_code != 500 or pause is None:
                    break
                await response.aclose()
                log.warning("the SuperLink answered %s with 500; sent again in %g s", path, pause)
                self.retried += 1
                await asyncio.sleep(pause)
        except httpx.TimeoutException:
            await _answer(send, 504, "the SuperLink did not answer in time")
            return
        except httpx.HTTPError as error:
            log.warning("the SuperLink is unreachable: %r", error)
            await _answer(send, 502, "the SuperLink is unreachable")
            return
        self.forwarded += 1
        try:
            raw = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            start = {"type": "http.response.start", "status": response.status_code}
            await send({**start, "headers": raw})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as error:  # the response started: the connection is dropped
            log.warning("the SuperLink's response to %s broke off: %r", path, error)
        finally:
            await response.aclose()


async def _answer(send: Send, status: int, text: str) -> None:
    """A short plain-text response that closes the connection."""
    body = f"{text}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default="0.0.0.0:9093",
        metavar="HOST:PORT",
        help="the public address the SuperNodes dial",
    )
    parser.add_argument(
        "--superlink",
        default="127.0.0.1:9092",
        metavar="HOST:PORT",
        help="the SuperLink's own address, on loopback (flower-superlink --host 127.0.0.1 "
        "--port PORT); its certificate must name HOST",
    )
    parser.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
    parser.add_argument(
        "--certfile", type=Path, required=True, help="the SuperLink's certificate (server.pem)"
    )
    parser.add_argument(
        "--keyfile", type=Path, required=True, help="the SuperLink's key (server.key)"
    )
    parser.add_argument(
        "--max-body-mb", type=int, default=MAX_BODY_MB, help="largest request body, in MiB"
    )
    parser.add_argument(
        "--max-buffered-mb",
        type=int,
        default=MAX_BUFFERED_MB,
        help="the most MiB of request bodies held at once (then 503)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a request body may take to arrive",
    )
    parser.add_argument(
        "--max-connections", type=int, default=1000, help="open connections at most (then 503)"
    )


def address(text: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 host in brackets) as ``(host, port)``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"fedrec: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    host, port = address(args.listen)
    link_host, link_port = address(args.superlink)
    for path in (args.ca, args.certfile, args.keyfile):
        if not path.is_file():
            raise SystemExit(f"fedrec: {path}: no such file")
    limits = (args.max_body_mb, args.max_buffered_mb, args.body_timeout, args.max_connections)
    if min(limits) <= 0:
        raise SystemExit(
            "fedrec: --max-body-mb, --max-buffered-mb, --body-timeout and --max-connections "
            "must be > 0"
        )
    if args.max_buffered_mb < args.max_body_mb:  # a body of the largest size could never pass
        raise SystemExit("fedrec: --max-buffered-mb must be at least --max-body-mb")
    gateway = FleetGateway(
        f"https://{link_host}:{link_port}",
        args.ca,
        max_body=args.max_body_mb << 20,
        body_timeout=args.body_timeout,
        max_buffered=args.max_buffered_mb << 20,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded call
    config = uvicorn.Config(
        gateway,
        host=host,
        port=port,
        ssl_certfile=str(args.certfile),
        ssl_keyfile=str(args.keyfile),
        http="h11",
        ws="none",
        lifespan="on",
        limit_concurrency=args.max_connections,
        timeout_keep_alive=30,
        server_header=False,
        access_log=False,  # refusals are logged above; forwarded calls are the SuperLink's
        log_level="info",
    )
    uvicorn.Server(config).run()
    return 0
