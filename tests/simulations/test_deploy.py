"""The federation on Flower's deployment engine (simulations/deploy.py,
simulations/local_federation.py, server/federation/credentials.py, server/privacy/ledger_gaps.py):
a SuperLink and SuperNodes as real processes on loopback, TLS and SuperNode authentication on.

- ``fedrec deploy local``: 3 nodes, 1 round (the fault run below has 4), and every process
  gone afterwards;
- a node without a registered key (or with no key, or without TLS) is refused;
- faults, in one DP run of 4 rounds: a node killed mid-round 1 (the round completes with the
  other two, the run goes on), then the whole server side (SuperLink and ServerApp) killed
  once the nodes have spent for round 2, restarted, and the run submitted again: it resumes
  after its last completed round with every node's spending in the ledger exactly once. The
  re-run round costs the nodes a contribution more than planned, so they decline the last
  round: the budget holds across the restart.

The expensive file (about 3 minutes on 2 cores): a killed node is reported by Flower only after
its heartbeat lapses (30 s interval, patience 2).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TEST_DEVICE, TINY_SETTINGS, cli_settings

from server.privacy.ledger import read_ledger, verify_chain
from shared.data.dataset import leave_one_out, load_dataset
from shared.data.partition import ensure_partitions
from shared.runs.config import RunConfig
from simulations.cli import main
from simulations.deploy import completed_round
from simulations.local_federation import LocalFederation

TINY = {**TINY_SETTINGS, "device": TEST_DEVICE}


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


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
            "3",
            "--rounds",
            "1",  # the rounds after the first, and resuming, are the fault run's (4 rounds)
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
    assert [(h["round"], h["nodes"]) for h in metrics["rounds"]] == [(1, 3)]
    # the server held the catalog only: the quality comes from the nodes, every round
    assert metrics["config"]["data"] == "" and metrics["config"]["catalog"].endswith("catalog")
    evaluations = metrics["federated_evaluation"]
    assert [e["round"] for e in evaluations] == [1] and all(e["nodes"] == 3 for e in evaluations)
    assert all(0 <= e["ndcg@10"] <= 1 and e["customers"] > 0 for e in evaluations)
    assert verify_chain(read_ledger(deployed / "ledger.jsonl")) == []
    link = (deployed / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in link  # TLS
    assert "SuperNode authentication is disabled" not in link
    assert (deployed / "deploy" / "certs" / "ca.crt").exists()
    assert (deployed / "deploy" / "certs" / "server.key").stat().st_mode & 0o077 == 0
    for node in range(1, 4):  # each node was given its own data directory, and only that
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


@pytest.mark.e2e
def test_nodes_without_a_registered_key_or_tls_are_refused(
    tiny_synth_dataset_dir: Path, tmp_path: Path
) -> None:
    data = tiny_synth_dataset_dir
    with LocalFederation(tmp_path) as federation:
        federation.start_superlink()
        intruders = {
            "unregistered": federation.start_node(
                "unregistered", data, federation.node_key("x", register=False)
            ),
            "no-key": federation.start_node("no-key", data),
        }
        intruders["plain"] = federation.start_node("plain", data, tls=False)
        for name, intruder in intruders.items():
            assert intruder.process.wait(timeout=60) != 0, name
        assert federation.online_nodes() == 0
        link = (tmp_path / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link


# --- faults ---------------------------------------------------------------------------------


def accountant_contributions(partition: Path) -> int:
    path = partition / "privacy" / "accountant.json"
    return json.loads(path.read_text())["contributions"] if path.exists() else 0


@pytest.fixture(scope="module")
def faulted(tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults") / "run"
    config = RunConfig(
        data=str(tiny_synth_dataset_dir),
        out=str(out),
        clients=3,
        dp_rounds=4,
        dp=True,
        text_model=str(tiny_bert_dir),
        **TINY,
    )
    dataset = load_dataset(tiny_synth_dataset_dir)  # the server side holds the data here
    partitions = ensure_partitions(dataset, leave_one_out(dataset), config, out)
    with LocalFederation(out) as federation:
        federation.start_superlink()
        for node in range(3):
            name = f"node-{node}"
            policy = {"text-models": str(tiny_bert_dir)}  # else only the packaged MiniLM
            federation.start_node(name, partitions / name, federation.node_key(name), policy=policy)
        federation.wait_for_nodes(3)
        first = federation.submit(config)
        # node 2 dies (with its ClientApp) as soon as it is handed round 1
        log = out / "logs" / "node-2.log"
        wait_for(lambda: "Start `flwr-clientapp`" in log.read_text(), 120, "round 1 at node 2")
        federation.kill("node-2", signal.SIGKILL)
        # the server side dies once node 0 has spent its round-2 budget
        node0 = partitions / "node-0"
        wait_for(lambda: accountant_contributions(node0) >= 2, 240, "round 2 at node 0")
        federation.kill("superlink", signal.SIGKILL)
        before_restart = completed_round(out)
        federation.start_superlink()
        federation.wait_for_nodes(2)
        second = federation.submit(config)
        wait_for(
            lambda: federation.status(second).startswith("finished"),
            300,
            "the resumed run",
            every=5,
        )
        status = federation.status(second)
        federation.save_run_log(second)
    return {
        "out": out,
        "partitions": partitions,
        "status": status,
        "first": first,
        "before_restart": before_restart,
    }


@pytest.mark.e2e
def test_a_node_killed_mid_round_leaves_the_round_to_the_others(faulted: dict) -> None:
    assert faulted["status"] == "finished:completed"
    metrics = json.loads((faulted["out"] / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [h["round"] for h in rounds][:3] == [1, 2, 3]
    assert {h["nodes"] for h in rounds} == {2}  # round 1 completed without node 2
    assert set(metrics["privacy"]["per_node"]) == {"regional-0", "regional-1"}


@pytest.mark.e2e
def test_a_restarted_server_resumes_with_the_ledger_intact(faulted: dict) -> None:
    out = faulted["out"]
    stopped_after = faulted["before_restart"]
    assert stopped_after in (1, 2)  # it was stopped mid-run
    metrics = json.loads((out / "metrics.json").read_text())
    rerun = stopped_after == 1  # round 2 was trained twice: the nodes decline round 4
    assert [h["round"] for h in metrics["rounds"]] == ([1, 2, 3] if rerun else [1, 2, 3, 4])
    ledger = read_ledger(out / "ledger.jsonl")
    assert verify_chain(ledger) == []
    kinds = [e["kind"] for e in ledger]
    assert kinds.count("run_start") == 1 and kinds[-1] == "run_end"
    assert kinds.count("run_end") == 1  # the killed run never ended; the resumed one did
    for node in (0, 1):
        mine = [
            e for e in ledger if e["kind"] == "contribution" and e["node"] == f"regional-{node}"
        ]
        # every spending of the node's accountant is in the ledger, once
        spent = accountant_contributions(faulted["partitions"] / f"node-{node}")
        # four trainings and the start guard's answer (its plan: four rounds, then the guard)
        assert [e["contribution_index"] for e in mine] == list(range(spent)) and spent == 5
        assert mine[-1]["purpose"] == "guard"
        declined = [
            e["round"]
            for e in ledger
            if e["kind"] == "declined" and e["node"] == f"regional-{node}"
        ]
        assert declined == ([4] if rerun else [])
    assert main(["audit", str(out)]) == 0


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
