"""A node whose only report the server refused (``unverified``) claims spending the ledger's
releases do not show: the run's statement is never below that claim
(server/federation/budget.py), and the audit, composing the ledger itself, never states less
than the server did (server/privacy/audit_federation.py)."""

from __future__ import annotations

from types import SimpleNamespace

from server.federation.budget import federation_privacy
from server.privacy.audit import audit
from server.privacy.ledger import read_ledger
from tests.server.test_audit_tampering import rechain
from tests.server.test_ledger_audit import copy_run, write_planned_run
from tests.server.test_unanswered import _config

CUSTOMERS = {"0": 1000, "1": 1000}


def test_the_audit_never_states_less_than_a_refused_report_claims(tmp_path):
    planned = read_ledger(
        write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, target=4.0, partition="merchant")
        / "ledger.jsonl"
    )
    claim = 3.9  # node 1's only report, refused: more than node 0's releases compose to
    refused = {
        "kind": "unverified",
        "round": 1,
        "node": "1",
        "reason": "signature",
        "epsilon": claim,
    }
    kept = [dict(e) for e in planned if e.get("node") != "1"]
    entries = rechain([*kept[:-1], refused, kept[-1]])
    stated = federation_privacy(SimpleNamespace(entries=entries), _config(entries))
    assert stated["epsilon"] == claim
    report = audit(copy_run(entries, tmp_path / "audited"))
    assert report["federation"]["epsilon"] >= stated["epsilon"]
    assert any("claims epsilon 3.9" in note for note in report["notes"])
