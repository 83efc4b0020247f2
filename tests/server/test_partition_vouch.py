"""The partition is the nodes' word, not the operator's (issue 15): a regional run's headline is
the worst node's epsilon only when every node vouched, in the releases it signed, that its
customers are its own alone (client/policy.py ``exclusive-customers``); otherwise, and for a
vouch the node did not sign, the composition over all nodes (server/privacy/accounting.py,
audit_federation.py, audit_signatures.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from client.policy import NodePolicy, PolicyError, parse_node_config
from server.federation.budget import federation_privacy
from server.privacy.audit import audit
from server.privacy.ledger import read_ledger
from shared.federation.reports import NodeReport, Release, ReportError, parse_report
from shared.federation.signing import NodeKey, signed_payload, verify
from simulations.deploy import vouching_policy
from tests.server.test_audit_tampering import failed, rechain
from tests.server.test_ledger_audit import CUSTOMERS, copy_run, write_planned_run
from tests.server.test_unanswered import _config, _with_unanswered


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, NodeKey]:
    where = tmp_path_factory.mktemp("keys")
    return {node: NodeKey.load_or_create(where / f"{node}.pem") for node in CUSTOMERS}


def claim(out: Path, epsilon: float) -> None:
    """The operator's metrics.json: ``epsilon`` as the headline at the delta of the guarantee
    that applies, each node's last epsilon."""
    cs = [e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"]
    per_node = {c["node"]: {"epsilon": c["epsilon"], "delta": c["delta"]} for c in cs}
    (out / "metrics.json").unlink(missing_ok=True)
    fed = audit(out)["federation"]
    privacy = {"epsilon": epsilon, "delta": fed[fed["applies"]]["delta"], "per_node": per_node}
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))


def test_regional_declared_over_merchant_nodes_states_the_composition(tmp_path, keys) -> None:
    # the operator runs merchants (each signs that its customers may shop elsewhere) and
    # declares regional: every node is asked the whole target, and claims the worst node
    out = write_planned_run(tmp_path, CUSTOMERS, keys=keys, vouch=False)
    worst = audit(out)["federation"]["one_node"]["epsilon"]
    claim(out, worst)
    report = audit(out)
    fed = report["federation"]
    assert fed["partition"] == "regional" and fed["applies"] == "all_nodes"
    assert fed["unvouched"] == sorted(CUSTOMERS)
    assert fed["epsilon"] == fed["all_nodes"]["epsilon"] > 1.3 * worst
    assert "at every node together" in report["guarantee"]
    assert any("did not vouch in their signed releases" in n for n in report["notes"])
    problems = failed(report)
    assert "below the recomputed guarantee" in problems["metrics"][0]
    assert "exceeds the run's target 4" in problems["federation_budget"][0]
    assert "signatures" not in problems  # the nodes said it: nothing forged


def test_nodes_vouching_exclusive_state_the_worst_node(tmp_path, keys) -> None:
    out = write_planned_run(tmp_path, CUSTOMERS, keys=keys)
    fed = audit(out)["federation"]
    claim(out, fed["one_node"]["epsilon"])
    report = audit(out)
    fed = report["federation"]
    assert report["passed"] and fed["applies"] == "one_node" and fed["unvouched"] == []
    assert fed["epsilon"] == max(fed["per_node"].values()) < fed["all_nodes"]["epsilon"]
    assert "every node vouched" in fed["why"]


def test_a_vouch_the_node_did_not_sign_is_not_believed(tmp_path, keys) -> None:
    merchants = write_planned_run(tmp_path / "merchants", CUSTOMERS, keys=keys, vouch=False)
    entries = read_ledger(merchants / "ledger.jsonl")
    for e in entries:  # the operator writes the vouch in, and re-chains the ledger
        if e["kind"] == "contribution":
            e["exclusive_customers"] = True
    forged = copy_run(rechain(entries), tmp_path / "forged")
    report = audit(forged, node_keys=merchants / "node-keys")
    assert report["federation"]["applies"] == "all_nodes"
    assert report["federation"]["unvouched"] == sorted(CUSTOMERS)
    assert all("does not verify" in p for p in failed(report)["signatures"])
    # nor is a true vouch that cannot be checked: no node keys to verify it with
    regions = write_planned_run(tmp_path / "regions", CUSTOMERS, keys=keys)
    report = audit(regions, node_keys=tmp_path / "no-keys")
    assert report["federation"]["applies"] == "all_nodes"
    assert any("signature verifies against its key" in n for n in report["notes"])
    # and a vouch the operator strips breaks the node's signature
    entries = read_ledger(regions / "ledger.jsonl")
    for e in entries:
        e.pop("exclusive_customers", None)
    stripped = copy_run(rechain(entries), tmp_path / "stripped")
    report = audit(stripped, node_keys=regions / "node-keys")
    assert report["federation"]["applies"] == "all_nodes" and "signatures" in failed(report)


def test_a_node_that_never_answered_has_not_vouched(tmp_path, keys) -> None:
    """A node a regional run asked that answered nothing ('unbounded': counted at the run's
    target, the whole of it, as a regional run asks) signed no vouch: were it left out of
    "every node", a merchant whose replies were lost would be stated at max(worst node,
    target) while a customer shopping there and at another node spent both."""
    run = write_planned_run(tmp_path / "run", CUSTOMERS, keys=keys)
    honest = read_ledger(run / "ledger.jsonl")
    silent = _with_unanswered(honest, "merchant-9")
    stated = federation_privacy(SimpleNamespace(entries=silent), _config(honest))
    assert stated["federation"]["unvouched"] == ["merchant-9"]
    assert stated["federation"]["applies"] == "all_nodes"
    assert stated["epsilon"] >= 4.0 * (len(CUSTOMERS) + 1)  # the target at each node
    report = audit(copy_run(silent, tmp_path / "silent"), node_keys=run / "node-keys")
    assert report["federation"]["unvouched"] == ["merchant-9"]
    assert report["federation"]["epsilon"] == pytest.approx(stated["epsilon"])
    assert any("merchant-9 left requests unanswered and signed no" in n for n in report["notes"])
    # nothing contributed at all: each silent node kept the whole target at most
    nothing = _with_unanswered([e for e in silent if e["kind"] != "contribution"], "other-9")
    stated = federation_privacy(SimpleNamespace(entries=nothing), _config(honest))
    assert stated["epsilon"] == 4.0 * 2
    assert audit(copy_run(nothing, tmp_path / "nothing"))["federation"]["epsilon"] == 8.0


def test_a_ledger_from_before_nodes_vouched_is_audited_as_not_vouched(tmp_path) -> None:
    out = write_planned_run(tmp_path, CUSTOMERS)  # unsigned, no release states it
    report = audit(out)
    fed = report["federation"]
    assert fed["applies"] == "all_nodes"
    assert any("a ledger from before nodes vouched" in n for n in report["notes"])
    # each node was asked the whole target, as a regional run asks: the composition exceeds it
    assert list(failed(report)) == ["federation_budget"]
    claim(out, fed["one_node"]["epsilon"])  # its metrics.json stated the worst node
    assert "metrics" in failed(audit(out))
    claim(out, fed["all_nodes"]["epsilon"])
    assert "metrics" not in failed(audit(out))


def test_a_node_signs_its_vouch_and_the_server_parses_it(keys) -> None:
    fields = {
        "run_id": "a" * 64,
        "round": 1,
        "node": "0",
        "purpose": "training",
        "contribution_index": 0,
        "mechanism": "poisson_subsampled_gaussian",
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "epsilon": 1.0,
        "accountant": "prv",
        "unit": "u",
        "target_epsilon": 2.0,
        "num_customers": 100,
        "update_digest": "",
    }
    for vouch in (True, False, None):
        release = Release(**fields, exclusive_customers=vouch)
        assert ("exclusive_customers" in release.as_dict()) == (vouch is not None)
        key = keys["0"]
        report = NodeReport(
            "0",
            release=release,
            signature=key.sign(signed_payload(release.as_dict())),
            key_id=key.key_id,
            public_key=key.public_pem,
        )
        parsed = parse_report(report.to_record())
        assert parsed.release == release
        assert verify(key.public_pem, parsed.release.as_dict(), parsed.signature)
        flipped = {**parsed.release.as_dict(), "exclusive_customers": not vouch}
        assert not verify(key.public_pem, flipped, parsed.signature)
    record = {**report.to_record(), "exclusive_customers": "yes"}
    with pytest.raises(ReportError, match="exclusive_customers"):
        parse_report(record)


def test_the_nodes_policy_vouches_as_its_operator_or_its_simulated_split_says(
    tmp_path,
) -> None:
    deployed = NodePolicy.from_node_config({"data-dir": "d"})
    assert not deployed.exclusive("regional")  # the safe default: says nothing, vouches nothing
    assert NodePolicy.from_node_config({"data-dir": "d", "exclusive-customers": "true"}).exclusive(
        "merchant"
    )
    simulated = NodePolicy.from_node_config({})
    assert simulated.exclusive("regional") and not simulated.exclusive("merchant")
    assert not NodePolicy.from_node_config({"exclusive-customers": False}).exclusive("regional")
    assert parse_node_config("exclusive-customers=true") == {"exclusive-customers": "true"}
    with pytest.raises(PolicyError, match="exclusive-customers"):
        parse_node_config("exclusive-customers=maybe")
    # fedrec deploy local: each node vouches as its node.json's split, unless told otherwise
    for name, split in (("r", "regional"), ("m", "merchant")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "node.json").write_text(json.dumps({"node": name, "partition": split}))
    assert vouching_policy(tmp_path / "r", {}) == {"exclusive-customers": True}
    assert vouching_policy(tmp_path / "m", None) == {"exclusive-customers": False}
    told = {"exclusive-customers": "false"}
    assert vouching_policy(tmp_path / "r", told)["exclusive-customers"] == "false"
