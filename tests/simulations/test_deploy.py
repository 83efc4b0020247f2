"""The federation on Flower's deployment engine (simulations/deploy.py,
simulations/local_federation.py, server/federation/credentials.py): a SuperLink and
SuperNodes as real processes on loopback, TLS and SuperNode authentication on.

``fedrec deploy local``: 2 nodes, 1 round, and every process gone afterwards.

The faults of a deployment (a node killed mid-round, the server side killed and restarted, and
nodes without a registered key, with no key or without TLS refused) are
tests/simulations/test_deploy_faults.py: its own file, so that the two expensive runs (minutes
each on 2 cores) can go to different test workers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TEST_DEVICE, TINY_SETTINGS, cli_settings

from server.privacy.ledger import read_ledger, verify_chain
from shared.runs.config import RunConfig
from simulations import deploy
from simulations.cli import main

TINY = {**TINY_SETTINGS, "device": TEST_DEVICE}


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def deployed(tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "run"
    settings = cli_settings({**TINY, "text_model": tiny_bert_dir})
    code = main(
        [
            "deploy",
            "local",
            "--data",
            str(tiny_synth_dataset_dir),
            "--out",
            str(out),
            "--nodes",
            "2",
            "--rounds",
            "1",  # the rounds after the first, and resuming: test_deploy_faults.py
            "--timeout",
            "300",
            "--quiet",
            "--node-config",
            # a deployed node requires DP unless its operator says otherwise, gives no exact
            # figure over fewer than 50 customers (these tiny nodes hold fewer) and loads no
            # text model but the packaged MiniLM unless its operator lists it
            f"require-dp=false min-exact-customers=1 text-models={tiny_bert_dir}",
            *settings,
        ]
    )
    assert code == 0, (out / "logs").iterdir()
    return out


@pytest.mark.e2e
def test_deploy_local_runs_the_federation_over_tls_with_authenticated_nodes(deployed: Path) -> None:
    metrics = json.loads((deployed / "metrics.json").read_text())
    assert [(h["round"], h["nodes"]) for h in metrics["rounds"]] == [(1, 2)]
    # the server held the catalog only: the quality comes from the nodes, every round
    assert metrics["config"]["data"] == "" and metrics["config"]["catalog"].endswith("catalog")
    evaluations = metrics["federated_evaluation"]
    assert [e["round"] for e in evaluations] == [1] and all(e["nodes"] == 2 for e in evaluations)
    assert all(0 <= e["ndcg@10"] <= 1 and e["customers"] > 0 for e in evaluations)
    assert verify_chain(read_ledger(deployed / "ledger.jsonl")) == []
    link = (deployed / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in link  # TLS
    assert "SuperNode authentication is disabled" not in link
    assert (deployed / "deploy" / "certs" / "ca.crt").exists()
    assert (deployed / "deploy" / "certs" / "server.key").stat().st_mode & 0o077 == 0
    for node in range(1, 3):  # each node was given its own data directory, and only that
        log = (deployed / "logs" / f"node-{node}.log").read_text()
        assert "Start `flwr-clientapp` process" in log
    assert processes_mentioning(str(deployed)) == []  # everything was shut down


@pytest.mark.e2e
def test_the_nodes_reach_the_superlink_only_through_the_fleet_gateway(deployed: Path) -> None:
    link = (deployed / "logs" / "superlink.log").read_text()
    gateway = (deployed / "logs" / "gateway.log").read_text()
    link_port = int(re.search(r"running on https://127\.0\.0\.1:(\d+)", link).group(1))
    gateway_port = int(re.search(r"running on https://127\.0\.0\.1:(\d+)", gateway).group(1))
    # the SuperLink listens on loopback; the nodes dial the gateway
    assert link_port != gateway_port
    # the nodes' calls went through it (the SuperLink's port is not theirs), none refused
    counts = r"forwarded (\d+) Fleet calls \((\d+) writes sent again\), refused (\d+)"
    forwarded, _, refused = re.search(counts, gateway).groups()
    assert int(forwarded) > 10 and int(refused) == 0


def test_secrets_are_owner_only_even_over_a_world_readable_file(tmp_path: Path) -> None:
    from server.federation.credentials import write_node_key, write_tls

    stale = tmp_path / "server.key"
    stale.write_bytes(b"old")
    stale.chmod(0o644)
    files = write_tls(tmp_path)
    private, public = write_node_key(tmp_path, "node-0")
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")


class Clock:
    """Stands in for ``time`` in simulations/deploy.py: a sleep moves it on, at once."""

    def __init__(self, at_nap: dict[int, Callable[[], None]]):
        self.now, self.naps, self.at_nap = 1000.0, 0, at_nap

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.naps += 1
        self.at_nap.get(self.naps, lambda: None)()


class Link:
    """A SuperLink whose run finishes with ``final`` once ``done`` exists; counts the asks."""

    def __init__(self, done: Path, final: str):
        self.done, self.final, self.asked = done, final, 0

    def status(self, run_id: int) -> str:
        self.asked += 1
        return self.final if self.done.exists() else "running"


def test_a_run_is_followed_to_its_end_without_asking_the_superlink_every_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr ls`` was run every 10 s (a process, about 2 s of CPU each), and a run was seen
    finished up to 10 s late."""
    metrics = tmp_path / "metrics.json"
    clock = Clock({3: lambda: metrics.write_text("{}")})  # the ServerApp's last write
    monkeypatch.setattr(deploy, "time", clock)
    link = Link(metrics, "finished:completed")
    assert deploy.follow(link, 1, RunConfig(out=str(tmp_path))) == "finished:completed"
    assert (clock.naps, link.asked) == (3, 1)
    # a run that fails writes no metrics: it is still seen, by asking every STATUS_EVERY_S
    clock, link = Clock({}), Link(tmp_path, "finished:failed")
    monkeypatch.setattr(deploy, "time", clock)
    assert deploy.follow(link, 2, RunConfig(out=str(tmp_path / "other"))) == "finished:failed"
    assert clock.now - 1000.0 == deploy.STATUS_EVERY_S and link.asked == 1
