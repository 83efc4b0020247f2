"""Hostile privacy reports against the ledger (server/federation/releases.py,
server/federation/release_bounds.py, server/privacy/ledger_gaps.py): a release outside the run's
plan, without noise, forged under SecAgg+ or unparseable is refused, never a crash, and what it
claims spent is recorded, never recomputed."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import node_reply, release

from server.federation.aggregation import NodeUpdate
from server.federation.budget import federation_privacy
from server.federation.denoising import injected_bias_variance
from server.federation.exchange import Federation
from server.federation.release_bounds import release_problem
from server.federation.releases import privacy_reports, record_privacy
from server.federation.strategy import FedRecStrategy
from server.privacy.audit import audit
from server.privacy.ledger import PrivacyLedger, verify_chain
from server.privacy.ledger_gaps import record_lost_contributions
from server.privacy.node_keys import NodeKeys
from shared.federation.reports import ReportError, parse_report
from shared.federation.signing import NodeKey
from shared.recommender.training import steps_per_epoch
from shared.runs.config import RunConfig

CONFIG = RunConfig(dp=True)


def planned(purpose: str = "training", customers: int = 2000, **changes) -> dict:
    """An honest release of ``CONFIG``'s plan at a node of ``customers`` (unsigned)."""
    batch = CONFIG.dp_batch_size if purpose == "training" else CONFIG.dp_encoder_batch
    per_epoch, rate = steps_per_epoch(customers, batch)
    fields = {"purpose": purpose, "num_customers": customers, "sample_rate": rate}
    if purpose == "training":
        fields |= {"steps": per_epoch * CONFIG.dp_local_epochs, "noise_multiplier": 0.8}
    elif purpose == "encoder":
        fields |= {"steps": per_epoch, "noise_multiplier": 0.8}
    else:
        noise = CONFIG.eval_noise_multiplier
        if purpose == "guard":
            noise = CONFIG.guard_noise(customers)
        fields |= {"mechanism": "gaussian", "steps": 1, "sample_rate": 1.0}
        fields["noise_multiplier"] = noise
    return release(**{**fields, **changes})


@pytest.mark.parametrize("purpose", ["training", "encoder", "evaluation", "guard"])
@pytest.mark.parametrize("customers", [40, 2000, 10**8])
def test_an_honest_release_is_within_the_plan(purpose: str, customers: int) -> None:
    report = parse_report(planned(purpose, customers))
    assert report.release is not None and release_problem(report.release, CONFIG) is None


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"steps": 10**6, "sample_rate": 1.0, "num_customers": 100}, "steps"),
        ({"steps": 10**5, "sample_rate": 1.0, "num_customers": 100}, "steps"),
        ({"mechanism": "gaussian", "steps": 10**12}, "gaussian"),
        ({"noise_multiplier": 1e-3}, "RDP bound"),
        ({"sample_rate": 1.0}, "sample_rate"),
        ({"delta": 1e-300, "noise_multiplier": 0.2}, "RDP bound"),
        # the accountant divided by zero, underflowed to a spend of 0 (the release was used)
        # and overflowed on these: each but the second crashed the round (found fuzzing)
        ({"noise_multiplier": 1e-200}, "noise_multiplier"),
        ({"noise_multiplier": 1e-160}, "noise_multiplier"),
        ({"noise_multiplier": 1e155}, "noise_multiplier"),
        ({"max_grad_norm": 1e200}, "max_grad_norm"),
        # what the audit could not recompute: one node's reply, not the whole run's audit
        ({"unit": "one event"}, "unit"),
        ({"accountant": "rdp"}, "accountant"),
        ({"steps": 0}, "steps"),
        # a DP-SGD release at sample rate 0 recomputes to a spend of 0; no noise, no finite one
        ({"sample_rate": 0.0}, "sample_rate 0.0 is outside (0, 1]"),
        ({"delta": 1.0}, "delta 1.0 is outside (0, 1)"),
        ({"noise_multiplier": 0.0}, "noise_multiplier 0.0 is outside"),
    ],
)
def test_a_release_outside_the_plan_is_refused_and_its_claim_recorded_as_sent(
    tmp_path: Path, changes: dict, words: str
) -> None:
    """A release the accountant could spend minutes and gigabytes on (10**6 steps asked for
    3.75 GiB, noise 0.001 for 76 GiB) is refused before any accounting: the reply is not used,
    and the ledger keeps its claimed epsilon in an ``unverified`` entry, never recomputed."""
    sent = planned(node="evil", **changes)
    reply = node_reply("evil", None, privacy=sent)
    started = time.time()
    received = privacy_reports(
        [reply], NodeKeys(tmp_path / "keys"), "r", 1, FedRecStrategy(CONFIG), sent={}
    )
    assert "malformed" in received.rejected["evil"] and words in received.rejected["evil"]
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports, unverified=received.unverified)
    assert time.time() - started < 20
    (entry,) = ledger.entries
    assert entry["kind"] == "unverified" and entry["node"] == "evil"
    assert entry["epsilon"] == sent["epsilon"] and entry["release"]["steps"] == sent["steps"]
    privacy = federation_privacy(ledger, CONFIG)  # never composed at the run's end either
    assert privacy["unverified"] == {"evil": 1.0} and "No node contributed" in privacy["statement"]


def test_a_refused_claim_is_stated_rounded_up(tmp_path: Path) -> None:
    """With no contribution, metrics.json's statement named the largest refused claim by
    ".3f": 0.99949 claimed was stated 0.999, below it."""
    sent = planned(node="evil", sample_rate=1.0, epsilon=0.99949)
    reply = node_reply("evil", None, privacy=sent)
    received = privacy_reports(
        [reply], NodeKeys(tmp_path / "keys"), "r", 1, FedRecStrategy(CONFIG), sent={}
    )
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports, unverified=received.unverified)
    statement = federation_privacy(ledger, CONFIG)["statement"]
    assert "claim up to epsilon 1.000 ('unverified')" in statement


@pytest.mark.parametrize("field", ["noise_multiplier", "sample_rate", "delta", "epsilon"])
def test_a_negative_figure_is_refused_when_parsed(field: str) -> None:
    with pytest.raises(ReportError, match=field):
        parse_report(release(**{field: -1.0}))


@pytest.mark.parametrize("value", [10**400, -(10**400), math.inf])
def test_a_number_beyond_any_float_is_refused_naming_the_field(value) -> None:
    with pytest.raises(ReportError, match="steps"):
        parse_report(release(steps=value))


@pytest.mark.parametrize("start", [0, -1, "1", True, 1.0, 10**400, None])
def test_a_server_start_that_is_no_start_is_refused_naming_the_field(start) -> None:
    """A release's server start orders the node's charges and settles requests in flight
    (server/privacy/ledger_gaps.py): anything but a whole number from 1 is refused (None, a
    node that states none, is not)."""
    if start is None:
        assert parse_report(release(server_start=None)).release.server_start is None
        return
    with pytest.raises(ReportError, match="server_start: expected a whole number from 1"):
        parse_report(release(server_start=start))


def test_zero_noise_and_an_index_gap_write_no_infinite_epsilon(tmp_path: Path) -> None:
    """The ledger holds finite numbers only: a gap whose parameters compose to no finite
    epsilon is not recovered (the audit reports it), and the release itself is recorded."""
    reply = node_reply("evil", None, privacy=release(noise_multiplier=0.0, contribution_index=1))
    received = privacy_reports(
        [reply], NodeKeys(tmp_path / "keys"), "r", 1, FedRecStrategy(CONFIG), sent={}
    )
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports, unverified=received.unverified)
    assert [e["kind"] for e in ledger.entries] == ["unverified"]
    assert ledger.entries[0]["epsilon"] == 1.0 and "noise_multiplier" in ledger.entries[0]["reason"]
    # a ledger from before the check: an exact release already there, then a gap
    fields = {k: v for k, v in release().items() if k not in ("public_key", "refused", "declined")}
    ledger.append("contribution", **{**fields, "noise_multiplier": 0.0})
    assert record_lost_contributions(ledger, 2, "n1", {**fields, "contribution_index": 2}) == []
    assert len(ledger.entries) == 2 and verify_chain(ledger.entries) == []


def test_an_unparseable_report_is_recorded_with_what_it_claims(tmp_path: Path) -> None:
    replies = [
        node_reply("n1", None, privacy=release(node="n1", steps="many", epsilon=3.5)),
        node_reply("n2", None, privacy={"node": "n2", "declined": "yes", "epsilon": math.nan}),
    ]
    strategy = FedRecStrategy(CONFIG)
    received = privacy_reports(replies, NodeKeys(tmp_path / "keys"), "r", 1, strategy, sent={})
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports, "evaluate", received.unverified)
    entries = [(e["kind"], e["node"], e.get("epsilon"), e["stage"]) for e in ledger.entries]
    assert entries == [
        ("unverified", "n1", 3.5, "evaluate"),
        ("unverified", "n2", None, "evaluate"),
    ]
    assert all(e["reason"].startswith("privacy report refused") for e in ledger.entries)


def _secure_round(
    tmp_path: Path, records: list[tuple[int, dict]], silent: tuple[int, ...] = ()
) -> tuple[int, list[dict]]:
    """A SecAgg+ training round whose nodes sent ``records`` (Flower node id, report); the
    nodes ``silent`` were sampled too but sent nothing: the nodes that contributed, and the
    ledger entries of the replies."""
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    total = {"w": np.zeros(2, np.float32)}
    sampled = [*(i for i, _ in records), *silent]
    sampler = SimpleNamespace(on_sample=None)

    def train_round(*_) -> tuple:  # noqa: ANN002
        sampler.on_sample(sampled)  # the request is ledgered before the setup leaves
        return total, records, sampled

    federation = SimpleNamespace(
        secure=SimpleNamespace(sampler=sampler, train_round=train_round),
        keys=NodeKeys(tmp_path / "keys"),
        run_id="this-run",
        ledger=ledger,
        strategy=FedRecStrategy(CONFIG),
        config=CONFIG,
        names={},
        start=1,
        resuming=False,
    )
    federation.record_unanswered = partial(Federation.record_unanswered, federation)
    federation.request = partial(Federation.request, federation)
    contributed = Federation.train(federation, 1, {}).contributed
    first, *_, last = ledger.entries  # the request written ahead, closed once recorded
    assert (first["kind"], last["kind"]) == ("requested", "answered")
    assert first["unnamed"] == sorted(sampled)
    return contributed, ledger.entries[1:-1]


def test_a_forged_secagg_report_is_recorded_as_a_claim_not_a_contribution(tmp_path: Path) -> None:
    """Under SecAgg+ the server checks each plain report as in any round: a report for
    another node, another run and round, under a junk signature, is no contribution."""
    forged = release(node="merchant-b", run_id="another-run", round=7, epsilon=50.0)
    contributed, entries = _secure_round(tmp_path / "forged", [(5, forged)])
    assert contributed == 0
    (entry,) = entries
    assert (entry["kind"], entry["node"], entry["round"], entry["epsilon"]) == (
        "unverified",
        "merchant-b",
        1,
        50.0,
    )
    key = NodeKey.load_or_create(tmp_path / "a.key")
    honest = planned(node="merchant-a", run_id="this-run", round=1, server_start=1)
    fields = {k: v for k, v in honest.items() if k not in ("signature", "key_id", "public_key")}
    fields = {k: v for k, v in fields.items() if k not in ("refused", "declined")}
    signed = {**honest, "signature": key.sign(fields), "key_id": key.key_id}
    signed["public_key"] = key.public_pem
    contributed, entries = _secure_round(tmp_path / "honest", [(6, signed), (5, forged)], (7,))
    assert contributed == 1
    assert [(e["kind"], e["node"]) for e in entries] == [
        ("contribution", "merchant-a"),
        ("unverified", "merchant-b"),
        ("unanswered", "flower node 7"),  # sampled, silent: it may have spent
    ]


def test_the_audit_lists_claims_and_still_passes_an_honest_ledger(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.append("run_start", config={"dp": False}, unit="u")
    ledger.append("unverified", round=1, node="evil", reason="forged", epsilon=50.0)
    ledger.append("run_end", rounds_completed=1, reason="done")
    report = audit(tmp_path)
    assert report["passed"] and report["unverified"][0]["epsilon"] == 50.0
    assert any("line(s) 2" in note for note in report["notes"])


def test_a_release_may_not_claim_more_customers_than_its_node_registered() -> None:
    """More customers loosen every bound (a smaller sample rate, more steps a round); a
    registered node's release is held to its registered figure, fewer being its own cost."""
    report = parse_report(planned(customers=10**6))
    assert "above the 2000 registered" in release_problem(report.release, CONFIG, 2000)
    assert release_problem(parse_report(planned(customers=1500)).release, CONFIG, 2000) is None


def test_figures_of_a_planned_release_that_overflow_float32_leave_the_round_running() -> None:
    """A release within the plan of a node claiming 10**18 customers, at the audit's largest
    noise, weighing the most a reply may: the DP noise it adds to the item biases overflowed
    float32 and crashed the round (found fuzzing); it is now computed in float64."""
    customers = 10**18
    report = parse_report(planned(customers=customers, noise_multiplier=1e6))
    assert report.release is not None and release_problem(report.release, CONFIG) is None
    update = NodeUpdate("n1", 1e9, {}, {})  # weight: MAX_CUSTOMERS
    variance = injected_bias_variance([report], [update], CONFIG, {"id_scores.bias": np.zeros(4)})
    assert variance is not None and math.isfinite(variance) and variance > 0
