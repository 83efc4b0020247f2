"""A node whose report the server refused (``unverified``) claims spending the ledger's releases
do not show. Where the worst node's guarantee applies the run's statement is never below that
claim; where every node's spending composes (a merchant run, or a regional one a node did not
vouch for) the claim is added to the composition, since the node spent it on top of the others
(server/privacy/claims.py). The audit, composing the ledger itself, never states less than the
server did (server/privacy/audit_federation.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from server.federation.budget import federation_privacy
from server.privacy.audit import audit
from server.privacy.claims import refused_claims
from server.privacy.ledger import read_ledger
from tests.server.test_audit_tampering import rechain
from tests.server.test_ledger_audit import copy_run, write_planned_run
from tests.server.test_unanswered import _config

CUSTOMERS = {"0": 1000, "1": 1000}


def refused(node: str, claim: float, **release) -> dict:
    """An ``unverified`` entry of ``node`` claiming ``claim`` (``release``: its release as sent)."""
    entry = {"kind": "unverified", "round": 1, "node": node, "reason": "signature"}
    return entry | {"epsilon": claim} | ({"release": release} if release else {})


def planned(tmp_path, partition: str, vouch: bool | None = None) -> list[dict]:
    out = tmp_path / f"run-{partition}"
    run = write_planned_run(out, CUSTOMERS, rounds=2, target=4.0, partition=partition, vouch=vouch)
    return read_ledger(run / "ledger.jsonl")


def stated(entries: list[dict]) -> dict:
    return federation_privacy(SimpleNamespace(entries=entries), _config(entries))


def with_refused(entries: list[dict], *claims: dict, drop: str | None = None) -> list[dict]:
    """``entries`` without ``drop``'s, the refused ``claims`` before the run's end, chained."""
    kept = [copy.deepcopy(e) for e in entries if drop is None or e.get("node") != drop]
    return rechain([*kept[:-1], *claims, kept[-1]])


def test_a_merchant_runs_statement_adds_a_refused_nodes_claim_to_the_others(tmp_path):
    """Node 1's every report was refused; it spent what it claims on top of node 0's releases:
    the statement used to be the larger of the two (3.9), below their composition."""
    entries = planned(tmp_path, "merchant")
    claim = 3.9
    alone = stated(with_refused(entries, drop="1"))
    both = stated(with_refused(entries, refused("1", claim), drop="1"))
    assert both["federation"]["applies"] == "all_nodes"
    assert both["epsilon"] == pytest.approx(alone["epsilon"] + claim)
    assert both["epsilon"] > claim  # the old statement: max(node 0's, the claim) = 3.9
    # the claim states no delta: it counts at the largest a node states, 1 / (10 x 1000)
    assert both["delta"] == pytest.approx(alone["delta"] + 1e-4)
    report = audit(copy_run(with_refused(entries, refused("1", claim), drop="1"), tmp_path / "a"))
    assert report["federation"]["epsilon"] >= both["epsilon"] * (1 - 1e-9)
    assert report["federation"]["all_nodes"]["delta"] == pytest.approx(both["delta"])
    assert any("claim epsilon up to 3.9" in note for note in report["notes"])


def test_a_regional_node_whose_every_report_was_refused_vouched_for_nothing(tmp_path):
    """Node 1 signed no release the server verified, so nothing says its customers are not
    node 0's: every node's spending composes, the claim added (it was the worst node's)."""
    entries = planned(tmp_path, "regional", vouch=True)
    alone = stated(with_refused(entries, drop="1"))
    assert alone["federation"]["applies"] == "one_node"
    both = stated(with_refused(entries, refused("1", 0.5, delta=1e-6), drop="1"))
    assert both["federation"]["applies"] == "all_nodes" and "1" in both["federation"]["unvouched"]
    assert both["epsilon"] >= alone["epsilon"] + 0.5
    report = audit(
        copy_run(with_refused(entries, refused("1", 0.5, delta=1e-6), drop="1"), tmp_path / "a")
    )
    assert report["federation"]["applies"] == "all_nodes"
    assert report["federation"]["epsilon"] >= both["epsilon"] * (1 - 1e-9)


def test_a_regional_node_that_vouched_keeps_the_worst_nodes_guarantee_at_its_claim(tmp_path):
    """Node 1 vouched in releases the server verified; a later report refused claims more:
    the worst node's guarantee still applies, never below the claim."""
    entries = planned(tmp_path, "regional", vouch=True)
    both = stated(with_refused(entries, refused("1", 9.5)))
    assert both["federation"]["applies"] == "one_node"
    assert both["epsilon"] == 9.5


def test_claims_keep_each_nodes_largest_and_skip_what_is_no_spending():
    claims = refused_claims(
        [
            refused("a", 0.2, delta=1e-5),
            refused("a", 0.7),
            refused("b", -1.0),
            {**refused("c", 1.0), "release": "not a release"},
            {"node": "d", "reason": "unparseable"},
        ]
    )
    assert claims == {"a": (0.7, 1e-5), "c": (1.0, None)}


def unanswered(node: str) -> dict:
    """A private request to ``node`` that went unanswered, no release of it bounding it."""
    return {"kind": "unanswered", "round": 2, "node": node, "reason": "no reply"}


@pytest.mark.parametrize("contributed", [True, False])
def test_a_merchant_claim_past_its_plan_and_an_unbounded_node_add_up(tmp_path, contributed):
    """A merchant run's plans keep the target (4) over every node together, node 9 never
    answered (bounded only by its plan), node 1's refused reports claim 5, past its plan: a
    customer of both spent up to its claim plus what node 9's plan keeps. The statement took
    the larger of the two alone (5, or the target)."""
    entries = planned(tmp_path, "merchant")
    if not contributed:
        entries = [e for e in entries if e["kind"] != "contribution"]
    ledger = with_refused(entries, refused("1", 5.0), unanswered("9"), drop="1")
    statement = stated(ledger)
    assert statement["unbounded"] == ["9"]
    assert statement["epsilon"] >= 4.0 + 5.0
    if contributed:
        report = audit(copy_run(ledger, tmp_path / "a"))
        assert report["federation"]["epsilon"] >= 4.0 + 5.0


@pytest.mark.parametrize("contributed", [True, False])
def test_a_regional_claim_and_an_unbounded_node_both_count_at_their_plans(tmp_path, contributed):
    """From the review: where no node vouched, each regional node was asked the whole target
    (4) and every node's spending composes. Node 1's reports were refused (it claims 3.9) and
    node 9 never answered (its plan: up to 4): a customer of both spent up to 7.9, on top of
    node 0's releases. The statement took node 9's plan at the target times the nodes that
    contributed or were unbounded, leaving node 1 out: 4 (none contributed) or 8, where the
    nodes' plans keep 4 + 4 + 4."""
    entries = planned(tmp_path, "regional")
    if not contributed:
        entries = [e for e in entries if e["kind"] != "contribution"]
    ledger = with_refused(entries, refused("1", 3.9), unanswered("9"), drop="1")
    statement = stated(ledger)
    plans = 4.0 * (3 if contributed else 2)
    assert statement["unbounded"] == ["9"]
    assert statement["epsilon"] >= plans
    if contributed:
        report = audit(copy_run(ledger, tmp_path / "a"))
        assert report["federation"]["applies"] == "all_nodes"
        assert report["federation"]["epsilon"] >= plans


def test_a_claim_stating_no_delta_is_never_stated_as_pure_dp(tmp_path):
    """From the review: where no release states a delta (none verified) and the claim states
    none, the audit stated the claim as (3.9, 0)-DP. It now counts at the largest delta a node
    takes, 1 / (10 x one customer)."""
    entries = [e for e in planned(tmp_path, "merchant") if e["kind"] != "contribution"]
    report = audit(copy_run(with_refused(entries, refused("1", 3.9)), tmp_path / "a"))
    assert report["federation"]["epsilon"] == 3.9
    assert report["federation"]["all_nodes"]["delta"] == 0.1
    assert report["guarantee"].startswith("(3.900, 0.1)-DP")


def test_the_worst_nodes_delta_is_never_below_a_claims(tmp_path):
    """From the review: the worst node's guarantee took a refused report's epsilon, not its
    delta: a claim at delta 1e-3 was stated at the nodes' 1e-4."""
    entries = planned(tmp_path, "regional", vouch=True)
    both = stated(with_refused(entries, refused("1", 9.5, delta=1e-3)))
    assert both["federation"]["applies"] == "one_node"
    assert both["epsilon"] == 9.5 and both["delta"] == 1e-3
