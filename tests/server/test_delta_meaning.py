"""Statements whose delta means nothing are warned of (server/privacy/deltas.py), and a
metrics.json statement at a looser delta than the audit's is held to the epsilon recomputed at
its own delta, one at a tighter delta fails (server/privacy/audit_federation.py,
``_statement_problems``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.federation.budget import federation_privacy
from server.privacy.audit import audit
from server.privacy.audit_federation import _statement_problems, federation_statement
from server.privacy.deltas import declared_customers, delta_warning
from server.privacy.ledger import read_ledger
from shared.runs.config import RunConfig
from simulations.cli import main
from simulations.deploy import finished
from simulations.verdict import verdict
from tests.helpers import release
from tests.server.test_audit_tampering import rechain
from tests.server.test_ledger_audit import copy_run, write_planned_run
from tests.server.test_unanswered import CUSTOMERS, _with_unanswered

SMALL_MERCHANTS = {str(n): 800 for n in range(4)}  # their own deltas sum to 5e-4, 1.6 / 3,200
MERCHANTS = {"0": 800, "1": 1000, "2": 800}  # 3.5e-4: 0.91 / 2,600


def _check(report: dict, name: str) -> dict:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


def test_the_warning_starts_at_one_over_the_customers_covered() -> None:
    """At delta >= 1/customers publishing a customer's whole history with probability delta,
    at least one customer in expectation, meets the guarantee."""
    assert delta_warning(1e-3, 999) is None and delta_warning(1e-3, 0) is None
    warning = delta_warning(1e-3, 1000)
    assert warning is not None and warning.startswith("WARNING: delta 0.001 is not below 1/1000")
    assert "at or below 0.0001 (--delta" in warning
    contributions = [
        release(node="a", num_customers=300),
        release(node="a", num_customers=200),
        release(node="b", num_customers=500),
        release(node="c", num_customers="many"),  # a tampered figure counts for nothing
    ]
    assert declared_customers(contributions) == 800


def test_many_small_merchants_own_deltas_are_warned_of_where_the_statement_is_made(
    tmp_path: Path,
) -> None:
    """Twenty merchants of 100 customers at their own delta 1/1,000: the statement over all
    nodes was at their sum, 0.02, for 2,000 customers (publishing 40 customers' whole
    histories meets it), and nothing said so. Its sentence (which the model card prints), its
    ``warning`` and the commands' summaries now do; at a run delta every node used, none."""
    config = RunConfig(dp=True, partition="merchant", clients=20, target_epsilon=8.0)

    def stated(delta: float, run_delta: float = 0.0) -> dict:
        entries = [
            {**release(node=str(n), delta=delta, num_customers=100), "kind": "contribution"}
            for n in range(20)
        ]
        run = RunConfig(**{**config.to_dict(), "delta": run_delta})
        return federation_privacy(SimpleNamespace(entries=entries), run)

    privacy = stated(1e-3)
    assert privacy["delta"] == pytest.approx(0.02)
    assert privacy["warning"].startswith("WARNING: delta 0.02 is not below 1/2000")
    assert privacy["statement"].endswith(privacy["warning"])
    (tmp_path / "ledger.jsonl").write_text("")
    metrics = {"test": {"ndcg@10": 0.2, "hr@10": 0.3}, "privacy": privacy}
    assert verdict(metrics, tmp_path)[-1].endswith(f"\n{privacy['warning']}")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert finished(tmp_path)[-1].endswith(f"\n{privacy['warning']}")
    used = stated(1e-5, run_delta=1e-5)
    assert used["delta"] == 1e-5 and "warning" not in used and "WARNING" not in used["statement"]


def test_the_audit_warns_of_a_meaningless_delta_and_still_passes(tmp_path: Path) -> None:
    small = write_planned_run(tmp_path / "small", SMALL_MERCHANTS, partition="merchant")
    report = audit(small)
    found = _check(report, "delta_meaning")
    assert report["federation"]["all_nodes"]["delta"] == pytest.approx(5e-4)
    assert found["status"] == "warn" and found["passed"] is True
    assert found["problems"][0].startswith("WARNING: delta 0.0005 is not below 1/3200")
    assert report["passed"] and "WARNING: delta at least 1/3200" in report["guarantee"]
    assert main(["audit", str(small)]) == 0
    assert "WARNING" in (small / "audit.html").read_text()
    fewer = audit(write_planned_run(tmp_path / "fewer", MERCHANTS, partition="merchant"))
    assert _check(fewer, "delta_meaning")["status"] == "pass"
    assert "WARNING" not in fewer["guarantee"]
    # a metrics.json (and so a card) that does not carry the warning: its reader is not told
    fed = report["federation"]
    privacy = {"epsilon": fed["epsilon"], "delta": fed["all_nodes"]["delta"]}
    privacy["per_node"] = {n["node"]: n["reported_epsilon"] for n in report["nodes"]}
    (small / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    unwarned = _check(audit(small), "delta_meaning")
    assert unwarned["status"] == "warn" and unwarned["problems"][1].startswith(
        "metrics.json states no such warning (privacy.warning), so neither does the model card"
    )
    privacy["warning"] = found["problems"][0]
    (small / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    assert _check(audit(small), "delta_meaning")["problems"] == found["problems"]


@pytest.fixture(scope="module")
def loose(tmp_path_factory) -> Path:
    """A merchant run whose start states delta 0.5, which no node used (each took its own,
    smaller): a ledger written before 2026-12-08 stated its composition at 0.5; the audit
    states it at the nodes' own."""
    out = write_planned_run(tmp_path_factory.mktemp("loose"), MERCHANTS, partition="merchant")
    entries = [dict(e) for e in read_ledger(out / "ledger.jsonl")]
    entries[0]["config"] = {**entries[0]["config"], "delta": 0.5}
    return copy_run(rechain(entries), tmp_path_factory.mktemp("loose-run"))


def _metrics_problems(out: Path, epsilon: float, delta: float) -> list[str]:
    """The metrics check's problems for a metrics.json stating (``epsilon``, ``delta``)."""
    cs = [e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"]
    per_node = {c["node"]: c["epsilon"] for c in cs}
    privacy = {"epsilon": epsilon, "delta": delta, "per_node": per_node}
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    return _check(audit(out), "metrics")["problems"]


def test_a_statement_at_a_looser_delta_passes_where_its_epsilon_holds_there(loose) -> None:
    """(epsilon, delta)-DP implies (epsilon, delta') for delta' > delta: a statement at a
    looser delta whose epsilon the ledger recomputes there failed as "above the guarantee's";
    an epsilon below the one recomputed there under-reports. Restated at a delta of at least
    1 / the customers (the old runs' 0.5), where an epsilon near 0 holds, it protects no one
    and fails."""
    cs = [e for e in read_ledger(loose / "ledger.jsonl") if e["kind"] == "contribution"]
    guarantee = audit(loose)["federation"]
    looser = 3.8e-4  # above the nodes' sum 3.5e-4, below 1 / 2,600 customers
    at_looser = federation_statement(cs, None, "merchant", at=looser)["epsilon"]
    assert guarantee["all_nodes"]["delta"] < looser < 1 / sum(MERCHANTS.values())
    assert at_looser < guarantee["epsilon"]  # looser delta, smaller epsilon
    assert _metrics_problems(loose, at_looser, looser) == []
    assert any("it holds (epsilon recomputed at 0.00038" in n for n in audit(loose)["notes"])
    (under,) = _metrics_problems(loose, at_looser * 0.9, looser)
    assert under.startswith("metrics.json states delta 0.00038, above the guarantee's")
    assert f"below the {at_looser:.4f} recomputed at that delta" in under
    at_half = federation_statement(cs, None, "merchant", at=0.5)["epsilon"]
    (vacuous,) = _metrics_problems(loose, at_half, 0.5)
    assert vacuous.startswith("metrics.json states delta 0.5, above the guarantee's")
    assert "and not below 1 / the 2600 customers declared: restated there" in vacuous


def test_a_looser_delta_fails_where_the_nodes_declared_no_customers(loose) -> None:
    """Nothing to judge a looser delta by (every node's num_customers below 1, on a ledger
    whose releases are not signed): restated at 0.4 with the epsilon recomputed there, it
    passed with a note (reviewer R, session 43)."""
    report = audit(loose)
    report["federation"]["customers"] = 0
    (vacuous,) = _statement_problems(report, 0.0, 0.4, 1e-6, lambda delta: 0.0)
    assert vacuous.startswith("metrics.json states delta 0.4, above the guarantee's")
    assert "not below 1 / the 0 customers declared" in vacuous


TIGHTER = "below the guarantee's {:.3g} for "
LARGER = "; at a smaller delta the epsilon is larger, and what bounds it here"


def test_a_statement_at_a_tighter_delta_fails_even_at_the_ledgers_composition_there(
    loose,
) -> None:
    """The audit's floors (a node's own epsilon, a plan's) are epsilons at the guarantee's
    delta and do not grow at a smaller one: a tighter delta fails, whatever its epsilon."""
    cs = [e for e in read_ledger(loose / "ledger.jsonl") if e["kind"] == "contribution"]
    at_tight = federation_statement(cs, None, "merchant", at=1e-9)["epsilon"]
    guarantee = audit(loose)["federation"]
    assert at_tight > guarantee["epsilon"]
    for epsilon in (at_tight, 10 * at_tight, guarantee["epsilon"]):
        (under,) = _metrics_problems(loose, epsilon, 1e-9)
        assert under.startswith("metrics.json states delta 1e-09, ")
        assert TIGHTER.format(guarantee["all_nodes"]["delta"]) in under and LARGER in under
    (nothing,) = _metrics_problems(loose, guarantee["epsilon"], 1.0)
    assert nothing == "metrics.json states delta 1, not a probability in (0, 1)"


def test_a_plans_floor_is_not_restated_at_a_tighter_delta(tmp_path: Path) -> None:
    """A node left a request unanswered that none of its releases bounds: the guarantee is at
    least the run's target at each node, what its plan keeps at the run's delta, (24, 2e-4).
    metrics.json stating (24, 1e-7) passed (the ledger composed at 1e-7 is below 24), though
    that plan alone spends more at 1e-7 (reviewer R, session 43)."""
    honest = write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, target=8.0)
    out = copy_run(
        _with_unanswered(read_ledger(honest / "ledger.jsonl"), "flower node 77"),
        tmp_path / "silent",
    )
    fed = audit(out)["federation"]
    cs = [e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"]
    assert federation_statement(cs, None, "regional", at=1e-7)["epsilon"] < fed["epsilon"] == 24
    (under,) = _metrics_problems(out, fed["epsilon"], 1e-7)
    assert TIGHTER.format(fed[fed["applies"]]["delta"]) in under and LARGER in under
    assert _metrics_problems(out, fed["epsilon"], fed[fed["applies"]]["delta"]) == []


def test_a_nodes_epsilon_stated_at_a_smaller_delta_fails(loose) -> None:
    """metrics.json's per_node (printed on the card) held each node's epsilon to the ledger's
    but not its delta: the node's epsilon at delta 1e-12 passed."""
    cs = [e for e in read_ledger(loose / "ledger.jsonl") if e["kind"] == "contribution"]
    fed = audit(loose)["federation"]
    last = {c["node"]: c for c in cs}

    def problems(delta_of) -> list[str]:
        per_node = {n: {"epsilon": c["epsilon"], "delta": delta_of(c)} for n, c in last.items()}
        headline = {"epsilon": fed["epsilon"], "delta": fed[fed["applies"]]["delta"]}
        (loose / "metrics.json").write_text(
            json.dumps({"privacy": headline | {"per_node": per_node}})
        )
        return _check(audit(loose), "metrics")["problems"]

    assert problems(lambda c: c["delta"]) == []
    assert problems(lambda c: 2 * c["delta"]) == []  # a looser delta claims less
    tight = problems(lambda c: 1e-12)
    assert len(tight) == len(last)
    assert tight[0] == (
        f"node 0: metrics.json states delta 1e-12 for it, below its releases' "
        f"{last['0']['delta']:.3g}: at a smaller delta its epsilon is larger than the one stated"
    )
