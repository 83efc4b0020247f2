"""Faults of a federation on Flower's deployment engine (simulations/local_federation.py,
simulations/deploy.py, server/privacy/ledger_gaps.py), in one DP run of 3 rounds, 3 nodes, TLS
and SuperNode authentication on: a node killed mid-round 1 (the round completes with the
other two, the run goes on), then the whole server side (SuperLink and ServerApp) killed once
the nodes have spent for round 2, restarted, and the run submitted again: it resumes after its
last completed round with every node's spending in the ledger exactly once. The re-run round
costs the nodes a contribution more than planned, so they decline the last round: the budget
holds across the restart. While the SuperLink waits out the killed node, nodes it must refuse
try to join: one with a key nobody registered, one with no key, one without TLS.

The expensive file (about 3 minutes on 2 cores): a killed node is reported by Flower only after
its heartbeat lapses (30 s interval, patience 2). ``fedrec deploy local`` itself is
tests/simulations/test_deploy.py.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TEST_DEVICE, TINY_SETTINGS

from server.privacy.ledger import read_ledger, verify_chain
from shared.data.dataset import leave_one_out, load_dataset
from shared.data.partition import ensure_partitions
from shared.runs.config import RunConfig
from simulations.cli import main
from simulations.deploy import completed_round, follow
from simulations.local_federation import CONNECTION, LocalFederation, Service

TINY = {**TINY_SETTINGS, "device": TEST_DEVICE}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def start_intruders(federation: LocalFederation, data: Path) -> dict[str, Service]:
    """Nodes the SuperLink must refuse: a key it never registered, no key, no TLS."""
    unregistered = federation.node_key("unregistered", register=False)
    return {
        "unregistered": federation.start_node("unregistered", data, unregistered),
        "no-key": federation.start_node("no-key", data),
        "plain": federation.start_node("plain", data, tls=False),
    }


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
        dp_rounds=3,
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
            # else only the packaged MiniLM; the split is regional: each node vouches for it
            policy = {"text-models": str(tiny_bert_dir), "exclusive-customers": True}
            federation.start_node(name, partitions / name, federation.node_key(name), policy=policy)
        federation.wait_for_nodes(3)
        first = federation.submit(config)
        # node 2 dies (with its ClientApp) as soon as it is handed round 1
        log = out / "logs" / "node-2.log"
        wait_for(lambda: "Start `flwr-clientapp`" in log.read_text(), 120, "round 1 at node 2")
        federation.kill("node-2", signal.SIGKILL)
        intruders = start_intruders(federation, partitions / "node-0")  # meanwhile
        # the server side dies once node 0 has spent its round-2 budget
        node0 = partitions / "node-0"
        wait_for(lambda: accountant_contributions(node0) >= 2, 240, "round 2 at node 0")
        refused = {name: node.process.wait(timeout=60) for name, node in intruders.items()}
        for name in intruders:
            federation.kill(name)  # gone: no longer the federation's
        nodes = federation.flwr("supernode", "list", CONNECTION)["nodes"]
        federation.kill("superlink", signal.SIGKILL)
        before_restart = completed_round(out)
        federation.start_superlink()
        federation.wait_for_nodes(2)
        second = federation.submit(config)
        status = follow(federation, second, config, timeout=300)
        federation.save_run_log(second)
    return {
        "out": out,
        "partitions": partitions,
        "status": status,
        "first": first,
        "before_restart": before_restart,
        "intruders": refused,
        "nodes": nodes,
        "registered": set(federation.node_ids.values()),
    }


@pytest.mark.e2e
def test_a_node_killed_mid_round_leaves_the_round_to_the_others(faulted: dict) -> None:
    assert faulted["status"] == "finished:completed"
    metrics = json.loads((faulted["out"] / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [h["round"] for h in rounds][:2] == [1, 2]
    assert {h["nodes"] for h in rounds} == {2}  # round 1 completed without node 2
    assert set(metrics["privacy"]["per_node"]) == {"regional-0", "regional-1"}


@pytest.mark.e2e
def test_a_restarted_server_resumes_with_the_ledger_intact(faulted: dict) -> None:
    out = faulted["out"]
    stopped_after = faulted["before_restart"]
    assert stopped_after in (1, 2)  # it was stopped mid-run
    metrics = json.loads((out / "metrics.json").read_text())
    rerun = stopped_after == 1  # round 2 was trained twice: the nodes decline round 3
    assert [h["round"] for h in metrics["rounds"]] == ([1, 2] if rerun else [1, 2, 3])
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
        # three trainings and the start guard's answer (its plan: three rounds, then the guard)
        assert [e["contribution_index"] for e in mine] == list(range(spent)) and spent == 4
        assert mine[-1]["purpose"] == "guard"
        declined = [
            e["round"]
            for e in ledger
            if e["kind"] == "declined" and e["node"] == f"regional-{node}"
        ]
        assert declined == ([3] if rerun else [])
    # node 2 died before its first signed release: nothing vouches that its customers are its
    # own, so the guarantee that applies composes every node's spending, at its plan (the
    # target) for node 2 (docs/privacy.md, "Who vouches for the partition"): above the target
    assert main(["audit", str(out)]) == 1
    report = json.loads((out / "audit.json").read_text())
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["federation_budget"]
    assert report["federation"]["applies"] == "all_nodes"


@pytest.mark.e2e
def test_nodes_without_a_registered_key_or_tls_are_refused(faulted: dict) -> None:
    assert all(code != 0 for code in faulted["intruders"].values()), faulted["intruders"]
    # the SuperLink knows the registered nodes only, and none of the intruders got online
    assert {int(node["node-id"]) for node in faulted["nodes"]} == faulted["registered"]
    online = [node for node in faulted["nodes"] if node["status"] == "online"]
    assert 2 <= len(online) <= 3  # nodes 0 and 1 (node 2 until its heartbeat lapses)
    link = (faulted["out"] / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link
