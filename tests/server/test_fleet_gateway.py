"""The Fleet gateway (server/federation/fleet_gateway.py) in front of a real SuperLink on loopback:
only the Fleet API gets through; the Control API (``flwr`` pointed at the gateway with the CA, as
an outsider would) and the Runtime API are refused there and never reach the SuperLink;
oversized, slow and malformed requests are refused without taking the gateway down; a node
with ``--trusted-entities`` refuses the locally built app; and SuperNodes that dial the
gateway complete a run (``fedrec deploy local``, 2 nodes, 1 round)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import TEST_DEVICE, TINY_SETTINGS

from server.federation.credentials import write_node_key, write_tls
from server.federation.fleet_gateway import FleetGateway, add_arguments, run
from shared.runs.config import RunConfig
from simulations.deploy import follow
from simulations.local_federation import HOST, LocalFederation, binary

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """A SuperLink (TLS, node authentication) behind its gateway, no node, no ``flwr`` call
    made to it yet: its log holds only what came through the gateway."""
    with LocalFederation(tmp_path_factory.mktemp("gateway")) as federation:
        federation.start_superlink()
        yield federation


def through_gateway(federation: LocalFederation) -> httpx.Client:
    assert federation.tls is not None
    return httpx.Client(
        base_url=f"https://{HOST}:{federation.port}",
        verify=ssl.create_default_context(cafile=str(federation.tls.ca)),
        timeout=30,
    )


def raw_exchange(federation: LocalFederation, data: bytes) -> bytes:
    """Send ``data`` as is over TLS to the gateway; its answer (b"" if it just closed)."""
    assert federation.tls is not None
    context = ssl.create_default_context(cafile=str(federation.tls.ca))
    with (
        socket.create_connection((HOST, federation.port), timeout=30) as plain,
        context.wrap_socket(plain, server_hostname=HOST) as tls,
    ):
        tls.sendall(data)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


def superlink_log(federation: LocalFederation) -> str:
    return (federation.logs / "superlink.log").read_text()


def gateway_alive_and_forwarding(federation: LocalFederation) -> None:
    assert federation.services["gateway"].process.poll() is None
    with through_gateway(federation) as client:
        # forwarded: the SuperLink itself refuses a call without a node's signature
        answer = client.post("/v1/fleet/get-run", content=b"", headers=PROTOBUF)
    assert answer.status_code == 401 and "SuperNode authentication" in answer.text


def outsider_flwr(
    federation: LocalFederation, home: Path, *args: str
) -> subprocess.CompletedProcess:
    """``flwr`` run by an outsider who has ``ca.crt`` and dials the gateway."""
    assert federation.tls is not None
    connection = {
        "address": f"{HOST}:{federation.port}",
        "root-certificates": str(federation.tls.ca),
    }
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "outside", "outside": connection}})
    )
    return subprocess.run(
        [binary("flwr"), *args, "outside", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=home,
        env=federation.env(home),
        timeout=120,
    )


@pytest.mark.e2e
def test_control_and_runtime_calls_are_refused_and_never_reach_the_superlink(
    link: LocalFederation, tmp_path: Path
) -> None:
    refused = [
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/v1/fleet/get-run"),  # a Fleet path, but not how a SuperNode calls it
        ("POST", "/v1/fleet/get-run?debug=1"),
        ("POST", "/v1/fleet/unknown-call"),
        ("POST", "/docs"),
        ("GET", "/"),
    ]
    with through_gateway(link) as client:
        for method, path in refused:
            answer = client.request(method, path, content=b"", headers=PROTOBUF)
            assert answer.status_code == 403, (method, path, answer.text)
    # a path that only becomes a Control call once its dot segments are resolved
    dotted = (
        b"POST /v1/fleet/../control/list-nodes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert raw_exchange(link, dotted).startswith(b"HTTP/1.1 403")

    _, key = write_node_key(tmp_path / "keys", "outsider")
    for args in (("ls",), ("supernode", "list"), ("supernode", "register", str(key))):
        done = outsider_flwr(link, tmp_path / "flwr", *args)
        answer = json.loads(done.stdout[done.stdout.find("{") :])
        assert answer["success"] is False and "403" in answer["error-message"], (args, answer)

    log = superlink_log(link)
    assert "/v1/control/" not in log and "/v1/runtime/" not in log
    assert "ControlServicer" not in log  # what the SuperLink logs for each Control call
    assert "refused POST b'/v1/control/list-nodes'" in (link.logs / "gateway.log").read_text()


@pytest.mark.e2e
def test_fleet_calls_are_forwarded(link: LocalFederation) -> None:
    gateway_alive_and_forwarding(link)
    assert '"POST /v1/fleet/get-run HTTP/1.1" 401' in superlink_log(link)


@pytest.mark.e2e
def test_oversized_slow_and_malformed_requests_are_refused_without_a_crash(
    link: LocalFederation,
) -> None:
    claimed = f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: {65 << 20}"
    # refused before any body is read
    assert raw_exchange(link, claimed.encode() + b"\r\n\r\nx").startswith(b"HTTP/1.1 413")
    with through_gateway(link) as client:
        streamed = (b"\0" * (1 << 20) for _ in range(65))  # chunked, no length announced
        answer = client.post("/v1/fleet/push-object", content=streamed, headers=PROTOBUF)
        assert answer.status_code == 413
    garbage = [
        b"\x16\x03\x01garbage\r\n\r\n",
        b"POST /v1/fleet/get-run HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/fleet/get-run HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ]
    for data in garbage:
        answer = raw_exchange(link, data)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), (data[:40], answer[:80])
    # plain HTTP to the TLS port: the handshake fails, and that is all
    with socket.create_connection((HOST, link.port), timeout=30) as plain:
        plain.sendall(b"POST /v1/control/list-nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not plain.recv(1024).startswith(b"HTTP/1.1 2")
    gateway_alive_and_forwarding(link)


class FakeSuperLink(httpx.AsyncBaseTransport):
    """Counts what reaches it and answers 200."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(await request.aread()))


def call(
    gateway: FleetGateway, chunks: list[bytes], delay: float = 0.0, disconnect: bool = False
) -> tuple[int, bytes] | None:
    """One POST /v1/fleet/push-object with its body in ``chunks``, ``delay`` s apart, then
    the client's disconnection if ``disconnect``; the answer (None: none)."""
    return asyncio.run(push_object(gateway, chunks, delay, disconnect))


async def push_object(
    gateway: FleetGateway, chunks: list[bytes], delay: float = 0.0, disconnect: bool = False
) -> tuple[int, bytes] | None:
    """:func:`call` inside a running event loop."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/fleet/push-object",
        "raw_path": b"/v1/fleet/push-object",
        "query_string": b"",
        "headers": [(b"host", b"link"), (b"x-flwr", b"kept")],
        "client": ("203.0.113.9", 1),
    }
    pending = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    last = {"type": "http.request", "body": b"", "more_body": False}
    pending.append({"type": "http.disconnect"} if disconnect else last)
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(delay)
        return pending.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    await gateway(scope, receive, send)
    if not sent:
        return None
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_body_is_bounded_in_size_and_time_and_forwarded_whole(tmp_path: Path) -> None:
    ca = write_tls(tmp_path).ca
    gateway = FleetGateway("https://link", ca, max_body=1000, body_timeout=0.2)
    upstream = FakeSuperLink()
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)
    assert call(gateway, [b"a" * 600, b"b" * 400]) == (200, b"a" * 600 + b"b" * 400)
    assert upstream.requests[0].headers["x-flwr"] == "kept"
    assert call(gateway, [b"a" * 600, b"b" * 401])[0] == 413
    assert call(gateway, [b"a"] * 3, delay=0.1)[0] == 408
    assert call(gateway, [b"a" * 600], disconnect=True) is None  # the client left mid-body
    assert len(upstream.requests) == 1  # none of the others reached the SuperLink
    assert (gateway.forwarded, gateway.refused) == (1, 2)


def test_the_bodies_held_at_once_are_bounded_in_bytes(tmp_path: Path) -> None:
    """A body is held whole until the SuperLink answers: a thousand connections, each sending
    a body just under --max-body-mb and stalling, held 64 GB (an outsider needs no key for
    that). Past --max-buffered-mb a request is answered 503 (a SuperNode retries it), and a
    body let go, answered or refused, is counted off."""
    ca = write_tls(tmp_path).ca
    gateway = FleetGateway("https://link", ca, max_body=1000, body_timeout=2.0, max_buffered=1500)
    upstream = FakeSuperLink()
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)

    async def one_stalling_one_not() -> list[tuple[int, bytes] | None]:
        async def later() -> tuple[int, bytes] | None:
            await asyncio.sleep(0.45)  # the first holds its 900 bytes from 0.3 s to 0.9 s
            return await push_object(gateway, [b"b" * 700])

        return await asyncio.gather(push_object(gateway, [b"a" * 900, b"a"], 0.3), later())

    first, second = asyncio.run(one_stalling_one_not())
    assert first == (200, b"a" * 901) and second is not None and second[0] == 503
    assert gateway.buffered == 0
    assert call(gateway, [b"b" * 700]) == (200, b"b" * 700)  # room again
    assert call(gateway, [b"c" * 1001])[0] == 413 and gateway.buffered == 0
    assert call(gateway, [b"d" * 600], disconnect=True) is None and gateway.buffered == 0
    assert call(gateway, [b"e"] * 3, delay=0.8)[0] == 408  # 2.4 s: past the body timeout
    assert gateway.buffered == 0


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        (["--max-buffered-mb", "0"], "must be > 0"),
        (["--max-buffered-mb", "8", "--max-body-mb", "64"], "at least --max-body-mb"),
    ],
)
def test_gateway_limits_that_no_body_could_pass_are_refused(
    tmp_path: Path, limits: list[str], words: str
) -> None:
    tls = write_tls(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    files = ["--ca", str(tls.ca), "--certfile", str(tls.certificate), "--keyfile", str(tls.key)]
    with pytest.raises(SystemExit, match=words):
        run(parser.parse_args([*files, *limits]))


@pytest.mark.e2e
def test_a_node_that_trusts_only_signed_apps_refuses_a_locally_built_one(
    link: LocalFederation, tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """flwr's ``--trusted-entities`` checks Flower Hub's signatures, which a FAB that ``flwr
    run`` builds from the source tree never has (docs/deployment.md, "Trusted apps")."""
    reviewer = ed25519.Ed25519PrivateKey.generate().public_key()
    public = reviewer.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f"fpk_reviewer: '{public}'\n")
    key = link.node_key("trusting")
    node = link.start_node(
        "trusting", tiny_synth_dataset_dir, key, {"require-dp": False}, trusted_entities=trusted
    )
    link.wait_for_nodes(1)
    out = tmp_path / "run"
    settings = {**TINY_SETTINGS, "device": TEST_DEVICE, "text_model": str(tiny_bert_dir)}
    config = RunConfig(
        data=str(tiny_synth_dataset_dir), out=str(out), clients=1, rounds=1, **settings
    )
    assert follow(link, link.submit(config), config, timeout=300).startswith("finished")
    assert "The FAB could not be verified" in node.log.read_text()
    assert json.loads((out / "metrics.json").read_text())["rounds"] == []


class BusySuperLink(httpx.AsyncBaseTransport):
    """Answers the first ``failures`` calls 500 (its state database locked), then 200; records
    how many calls it handled at once."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = self.active = self.most_at_once = 0
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.bodies.append(await request.aread())
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        await asyncio.sleep(0.05)  # storing takes a while
        self.active -= 1
        if self.calls <= self.failures:
            return httpx.Response(
                500, stream=httpx.ByteStream(b'{"detail": "Internal Server Error"}')
            )
        return httpx.Response(200, stream=httpx.ByteStream(await request.aread()))


def test_a_reply_is_written_one_at_a_time_and_sent_again_after_a_500(tmp_path: Path) -> None:
    ca = write_tls(tmp_path).ca
    gateway = FleetGateway("https://link", ca, write_retries=(0.01, 0.01))
    upstream = BusySuperLink(failures=2)
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)
    assert call(gateway, [b"chunk"]) == (200, b"chunk")  # the third try is stored
    assert (upstream.calls, gateway.retried) == (3, 2)
    # a SuperLink that keeps failing: its last 500 goes back to the node after the retries
    upstream = BusySuperLink(failures=10)
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)
    assert call(gateway, [b"chunk"])[0] == 500
    assert upstream.calls == 3

    # ten nodes pushing at once reach the SuperLink one after the other
    upstream = BusySuperLink(failures=0)
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)

    async def ten_at_once() -> list[tuple[int, bytes] | None]:
        return await asyncio.gather(*(push_object(gateway, [b"x"]) for _ in range(10)))

    assert asyncio.run(ten_at_once()) == [(200, b"x")] * 10
    assert (upstream.calls, upstream.most_at_once) == (10, 1)

    # a failing write waits for its resend without the lock: another node's goes first
    gateway = FleetGateway("https://link", ca, write_retries=(0.5,))
    upstream = BusySuperLink(failures=1)
    gateway.client = httpx.AsyncClient(base_url="https://link", transport=upstream)

    async def one_failing_one_not() -> list[tuple[int, bytes] | None]:
        async def later() -> tuple[int, bytes] | None:
            await asyncio.sleep(0.1)
            return await push_object(gateway, [b"b"])

        return await asyncio.gather(push_object(gateway, [b"a"]), later())

    assert asyncio.run(one_failing_one_not()) == [(200, b"a"), (200, b"b")]
    assert upstream.bodies == [b"a", b"b", b"a"]
