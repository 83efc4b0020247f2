"""A private request whose reply never comes may have been spent (server/privacy/ledger_gaps.py):
the server ledgers it as ``unanswered``, the run's statement and the audit count it as spent
until the node's next contribution shows by its index whether it was, and a run that ends with
a reply lost never states less than was spent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from flwr.app import Error, Message
from helpers import metadata, node_reply

from server.federation.budget import federation_privacy
from server.federation.exchange import Federation
from server.federation.releases import heard_from
from server.federation.strategy import FedRecStrategy
from server.privacy.accounting import epsilon_curve
from server.privacy.audit import audit
from server.privacy.ledger import RESERVED, PrivacyLedger, read_ledger
from server.privacy.ledger_gaps import (
    NO_REPLY,
    RECOVERED,
    none_trained,
    outstanding_requests,
    record_lost_contributions,
    request_purpose,
)
from shared.federation.signing import NodeKey
from shared.runs.config import RunConfig
from tests.server.test_audit_tampering import failed, rechain
from tests.server.test_ledger_audit import copy_run, write_planned_run

CUSTOMERS = {"0": 1000, "1": 1000}  # one delta: every figure at the same delta


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, NodeKey]:
    """The nodes' keys: a regional run's headline needs their signed vouch."""
    where = tmp_path_factory.mktemp("keys")
    return {node: NodeKey.load_or_create(where / f"{node}.pem") for node in CUSTOMERS}


def error_reply(node_id: int, reason: str) -> Message:
    """What Flower returns in place of a node's reply when the node is gone."""
    return Message(error=Error(code=0, reason=reason), metadata=metadata(node_id, 0))


@pytest.mark.parametrize("dp", [True, False])
def test_each_node_a_private_request_reached_without_a_reply_is_ledgered(tmp_path, dp):
    config = RunConfig(dp=dp)
    federation = SimpleNamespace(
        config=config,
        ledger=PrivacyLedger(tmp_path / "ledger.jsonl"),
        strategy=FedRecStrategy(config),
        names={9: "merchant-9"},  # heard from in an earlier round
    )
    replies = [node_reply("merchant-1", None, node_id=1), error_reply(2, "node unavailable")]
    Federation.record_unanswered(
        federation, 3, [1, 2, 9], *heard_from(replies, federation.strategy), "evaluate.guard"
    )
    entries = [
        (e["kind"], e["round"], e["node"], e["reason"], e["stage"])
        for e in federation.ledger.entries
        if e["kind"] == "unanswered"
    ]
    expected = [
        ("unanswered", 3, "flower node 2", "error: node unavailable", "evaluate.guard"),
        ("unanswered", 3, "merchant-9", NO_REPLY, "evaluate.guard"),
    ]
    assert entries == (expected if dp else [])
    # then the exchange is closed: its request is no longer in flight (ledger_gaps.in_flight)
    closed = [(e["kind"], e["round"], e["stage"]) for e in federation.ledger.entries[2:]]
    assert closed == ([("answered", 3, "evaluate.guard")] if dp else [])
    assert federation.names[1] == "merchant-1"  # learnt from its reply


def _with_unanswered(entries: list[dict], node: str, stage: str = "train") -> list[dict]:
    """``entries`` with a request of ``stage`` to ``node`` left unanswered after the last round
    (before run_end), as the server records it."""
    end = entries[-1]
    assert end["kind"] == "run_end"
    named = {} if stage == "train" else {"stage": stage}
    lost = {
        "kind": "unanswered",
        "round": end["rounds_completed"],
        "node": node,
        "reason": NO_REPLY,
    }
    return rechain([dict(e) for e in entries[:-1]] + [{**lost, **named}, dict(end)])


def _lose_last_round(entries: list[dict], node: str) -> tuple[list[dict], list[dict]]:
    """(``entries`` without ``node``'s releases of the last round, the same with each of those
    requests recorded as unanswered instead): the node stopped after spending them."""
    last = entries[-1]["rounds_completed"]
    lost = [
        e
        for e in entries
        if e["kind"] == "contribution" and e["node"] == node and e["round"] == last
    ]
    dropped = rechain([dict(e) for e in entries if not any(e is x for x in lost)])
    stages = {"training": "train", "evaluation": "evaluate", "guard": "evaluate.guard"}
    recorded = dropped
    for release in lost:
        recorded = _with_unanswered(recorded, node, stages[release["purpose"]])
    return dropped, recorded


def _config(entries: list[dict]) -> RunConfig:
    config = entries[0]["config"]
    return RunConfig(
        dp=True,
        target_epsilon=config["target_epsilon"],
        partition=config["partition"],
        delta=config["delta"],
        eval_noise_multiplier=config["eval_noise_multiplier"],
        dp_guard_noise_scale=config.get("dp_guard_noise_scale", 0.4),
    )


@pytest.mark.parametrize("partition", ["regional", "merchant"])
def test_replies_lost_at_the_end_count_as_spent_in_the_statement_and_the_audit(
    tmp_path, partition, keys
):
    """Node 1 spent its last round's training and evaluation releases and stopped: without the
    unanswered entries the run would state less than was spent; with them, what was spent."""
    honest = read_ledger(
        write_planned_run(tmp_path / "honest", CUSTOMERS, rounds=2, partition=partition, keys=keys)
        / "ledger.jsonl"
    )
    node_keys = tmp_path / "honest" / "node-keys"
    config = _config(honest)
    spent = federation_privacy(SimpleNamespace(entries=honest), config)
    dropped, recorded = _lose_last_round(honest, "1")
    without = federation_privacy(SimpleNamespace(entries=dropped), config)
    stated = federation_privacy(SimpleNamespace(entries=recorded), config)

    assert without["federation"]["per_node"]["1"] < spent["federation"]["per_node"]["1"]
    assert stated["federation"]["per_node"]["1"] == pytest.approx(
        spent["federation"]["per_node"]["1"], rel=1e-6
    )
    assert stated["epsilon"] == pytest.approx(spent["epsilon"], rel=1e-6)
    assert stated["per_node"]["1"]["outstanding"] == 2
    assert stated["per_node"]["1"]["epsilon"] == without["per_node"]["1"]["epsilon"]  # the ledger's
    assert "2 private request(s) of 1 node(s) went unanswered" in stated["statement"]

    # the audit composes the same figure its own way, and the run's rounds stay covered
    out = copy_run(recorded, tmp_path / "recorded")
    (out / "metrics.json").write_text(json.dumps({"privacy": stated}))
    report = audit(out, node_keys=node_keys)
    assert report["passed"], failed(report)
    assert report["federation"]["epsilon"] == pytest.approx(spent["epsilon"], rel=1e-3)
    assert report["federation"]["outstanding_accounted"] == 2
    assert any("went unanswered" in note for note in report["notes"])

    if partition == "merchant":  # (regional: the headline is the worst node, node 0 here)
        # a metrics.json that leaves the lost replies out claims too little
        assert without["epsilon"] < spent["epsilon"]
        (out / "metrics.json").write_text(json.dumps({"privacy": without}))
        assert "metrics" in failed(audit(out, node_keys=node_keys))


def test_a_lost_guard_answer_counts_as_the_one_its_plan_gives(tmp_path, keys):
    """The start guard's comparison is asked once, last: a node whose answer is lost has no
    guard release to copy, and its plan's one answer is what it spent, not a training round."""
    honest = read_ledger(
        write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, guard_scale=0.4, keys=keys)
        / "ledger.jsonl"
    )
    (guard,) = [e for e in honest if e.get("purpose") == "guard" and e["node"] == "1"]
    lost = rechain([dict(e) for e in honest if e is not guard])
    lost = _with_unanswered(lost, "1", "evaluate.guard")
    config = _config(honest)
    spent = federation_privacy(SimpleNamespace(entries=honest), config)
    stated = federation_privacy(SimpleNamespace(entries=lost), config)
    assert stated["federation"]["per_node"]["1"] == pytest.approx(
        spent["federation"]["per_node"]["1"], rel=1e-6
    )
    report = audit(copy_run(lost, tmp_path / "lost"), node_keys=tmp_path / "run" / "node-keys")
    assert report["passed"], failed(report)
    assert report["federation"]["per_node"]["1"] == pytest.approx(
        spent["federation"]["per_node"]["1"], rel=1e-3
    )


def test_a_later_rounds_release_or_a_recovered_one_settles_an_unanswered_request(tmp_path):
    """The node's index shows whether the lost request was charged once it releases in a later
    round (a node charges a request before any of a later round), or when the server recovers
    the gap; a release of the same round settles nothing (two requests at once may be charged
    in either order)."""

    def entry(kind: str, server_round: int, **fields) -> dict:
        return {"kind": kind, "round": server_round, "node": "1", **fields}

    lost = entry("unanswered", 2, reason=NO_REPLY)
    same_round = entry("contribution", 2, purpose="evaluation")
    assert outstanding_requests([lost, same_round]) == {"1": [lost]}
    assert outstanding_requests([lost, same_round, entry("contribution", 3)]) == {}
    recovered = entry("contribution", 2, recovered="spent but never recorded")
    assert outstanding_requests([lost, recovered]) == {}
    # the model's rounds (numbered from 1 again) follow the encoder's
    encoder = entry("unanswered", 3, stage="train.encoder", reason=NO_REPLY)
    assert outstanding_requests([encoder, entry("contribution", 3, purpose="encoder")]) != {}
    assert outstanding_requests([encoder, entry("contribution", 1, purpose="training")]) == {}

    # in a run: node 1's round-1 evaluation reply lost, then it releases in round 2: no gap
    honest = read_ledger(write_planned_run(tmp_path, CUSTOMERS, rounds=2) / "ledger.jsonl")
    at = next(i for i, e in enumerate(honest) if e.get("round") == 2)
    lost = {"kind": "unanswered", "round": 1, "node": "1", "reason": NO_REPLY, "stage": "evaluate"}
    entries = rechain([dict(e) for e in honest[:at]] + [lost] + [dict(e) for e in honest[at:]])
    assert outstanding_requests(entries) == {}
    config = _config(honest)
    assert (
        federation_privacy(SimpleNamespace(entries=entries), config)["epsilon"]
        == (federation_privacy(SimpleNamespace(entries=honest), config)["epsilon"])
    )
    guard = _with_unanswered(honest, "1", "evaluate.guard")
    assert [request_purpose(e) for e in outstanding_requests(guard)["1"]] == ["guard"]


def test_a_node_that_never_answered_raises_the_statement_to_the_target(tmp_path):
    honest = read_ledger(
        write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, target=8.0) / "ledger.jsonl"
    )
    silent = _with_unanswered(honest, "flower node 77")
    statement = federation_privacy(SimpleNamespace(entries=silent), _config(honest))
    assert statement["unbounded"] == ["flower node 77"]
    assert statement["epsilon"] >= 8.0 and "'unbounded'" in statement["statement"]
    report = audit(copy_run(silent, tmp_path / "silent"))
    assert report["federation"]["epsilon"] >= 8.0
    assert any(note.startswith("node(s) flower node 77 left") for note in report["notes"])
    # nothing contributed at all: metrics.json still states an epsilon
    nothing = [e for e in silent if e["kind"] != "contribution"]
    assert federation_privacy(SimpleNamespace(entries=nothing), _config(honest))["epsilon"] == 8.0


def test_a_training_round_lost_without_an_entry_still_fails_the_rounds_check(tmp_path):
    """The entry is what covers the round: the same ledger without it fails ``rounds``."""
    honest = read_ledger(write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2) / "ledger.jsonl")
    dropped, recorded = _lose_last_round(honest, "1")
    assert "rounds" in failed(audit(copy_run(dropped, tmp_path / "dropped")))
    assert "rounds" not in failed(audit(copy_run(recorded, tmp_path / "recorded")))


def test_a_receipt_of_a_lost_reply_passes_as_counted_and_no_costlier(tmp_path):
    """The node's receipt log holds the release whose reply was lost: the receipts check
    accepts it only as an unanswered request's, at no more than the audit counted."""
    where = tmp_path / "keys"
    keys = {node: NodeKey.load_or_create(where / f"{node}.pem") for node in CUSTOMERS}
    run = write_planned_run(
        tmp_path / "run", CUSTOMERS, rounds=2, keys=keys, receipts=tmp_path / "receipts"
    )
    dropped, recorded = _lose_last_round(read_ledger(run / "ledger.jsonl"), "1")
    receipts = {node: tmp_path / "receipts" / f"{node}.jsonl" for node in CUSTOMERS}

    def audited(entries: list[dict], name: str) -> dict:
        out = copy_run(entries, tmp_path / name)
        return audit(out, node_keys=run / "node-keys", receipts=receipts)

    report = audited(recorded, "recorded")
    assert report["passed"], failed(report)
    assert sum("recorded as unanswered" in note for note in report["notes"]) == 2
    assert "is not in the ledger" in " ".join(failed(audited(dropped, "dropped"))["receipts"])

    # a receipt at half the noise the node's releases carry: costlier than what was counted
    lines = receipts["1"].read_text().splitlines()
    last = json.loads(lines[-1])
    lines[-1] = json.dumps({**last, "noise_multiplier": last["noise_multiplier"] / 2})
    receipts["1"].write_text("\n".join(lines) + "\n")
    problems = failed(audited(recorded, "costlier"))["receipts"]
    assert problems == [
        f"node 1, round 2: its receipt (contribution_index {last['contribution_index']}) is not "
        "in the ledger (its release may cost more than the audit counted for the unanswered "
        "request)"
    ]


def _reindexed(entries: list[dict], node: str, keep) -> list[dict]:
    """``entries`` with ``node``'s contributions cut to those ``keep`` accepts, re-indexed and
    their cumulative epsilons recomputed (what an honest node of that history reports)."""
    out, mine = [], []
    for e in entries:
        e = dict(e)
        if e["kind"] == "contribution" and e["node"] == node:
            if not keep(e):
                continue
            e["contribution_index"] = len(mine)
            mine.append(e)
        out.append(e)
    for e, epsilon in zip(mine, epsilon_curve(mine), strict=True):
        e["epsilon"] = epsilon
    return out


def _evaluation_only(honest: list[dict]) -> list[dict]:
    """Node 1 not sampled in round 1 (``fraction-train``) but answering its evaluation."""
    return _reindexed(honest, "1", lambda e: (e["round"], e["purpose"]) == (1, "evaluation"))


@pytest.mark.parametrize("partition", ["regional", "merchant"])
def test_a_lost_training_round_of_a_node_that_never_trained_is_unbounded(tmp_path, partition):
    """From the review: node 1 answered round 1's evaluation only; sampled in round 2, it spent
    a DP-SGD round and stopped. No release of it bounds a training round: it was counted at
    one evaluation answer (0.51 where 3.15 was spent); it is now unbounded, and the statement
    and the audit are at least the run's target."""
    honest = read_ledger(
        write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, partition=partition)
        / "ledger.jsonl"
    )
    config = _config(honest)
    keep = {(1, "evaluation"), (2, "training")}
    truth = rechain(_reindexed(honest, "1", lambda e: (e["round"], e["purpose"]) in keep))
    spent = federation_privacy(SimpleNamespace(entries=truth), config)
    end = _evaluation_only(honest)
    lost = [
        {"kind": "unanswered", "round": 2, "node": "1", "reason": NO_REPLY, **stage}
        for stage in ({}, {"stage": "evaluate"})
    ]
    ledger = rechain([*end[:-1], *lost, end[-1]])
    stated = federation_privacy(SimpleNamespace(entries=ledger), config)
    assert stated["unbounded"] == ["1"]
    assert stated["epsilon"] >= max(spent["epsilon"], config.target_epsilon)
    report = audit(copy_run(ledger, tmp_path / "recorded"))
    assert report["federation"]["unbounded"] == ["1"]
    assert report["federation"]["epsilon"] >= spent["epsilon"]


def test_a_gap_no_dp_sgd_release_bounds_is_not_recovered_and_counts_unbounded(tmp_path):
    """From the review: the same node's round-2 evaluation (index 2) shows its lost training
    round (index 1); it was recovered as an evaluation answer. Nothing of the node bounds a
    DP-SGD round, so the gap stays (the audit reports it) and the node is unbounded."""
    honest = read_ledger(write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2) / "ledger.jsonl")
    ledger = PrivacyLedger(tmp_path / "server" / "ledger.jsonl")
    for e in _evaluation_only(honest)[1:-1]:
        ledger.append(e["kind"], **{k: v for k, v in e.items() if k not in RESERVED})
    (answer,) = [e for e in ledger.entries if e["node"] == "1"]
    lost_before = {**answer, "round": 2, "contribution_index": 2}
    assert record_lost_contributions(ledger, 2, "1", lost_before) == []
    ledger.append("contribution", **{k: v for k, v in lost_before.items() if k not in RESERVED})
    statement = federation_privacy(ledger, _config(honest))
    assert statement["unbounded"] == ["1"] and statement["epsilon"] >= 4.0


def test_the_writers_composition_is_never_below_a_nodes_own_epsilon(tmp_path):
    """From the review: with each node's own delta (delta 0), every node together was stated
    at the sum of their deltas and could fall below one node's own epsilon, which the audit
    (rightly) never goes below: an honest run failed its ``metrics`` check."""
    honest = read_ledger(
        write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2, partition="merchant")
        / "ledger.jsonl"
    )
    entries = rechain(_evaluation_only(honest))
    stated = federation_privacy(SimpleNamespace(entries=entries), _config(honest))
    reported = max(e["epsilon"] for e in entries if e["kind"] == "contribution")
    assert stated["epsilon"] >= reported
    out = copy_run(entries, tmp_path / "recorded")
    (out / "metrics.json").write_text(json.dumps({"privacy": stated}))
    assert "metrics" not in failed(audit(out))


@pytest.mark.parametrize(
    "field, value",
    [
        ("round", "x"),
        ("round", None),
        ("round", 1.5),
        ("round", [1]),
        ("node", 7),
        ("stage", "x"),
        ("stage", {"a": 1}),
    ],
)
def test_a_tampered_unanswered_entry_fails_the_fields_check_and_crashes_nothing(
    tmp_path, field, value
):
    """Found in this session's own fuzzing: a round that is not a number crashed the audit
    (comparing it with a contribution's, or hashing a list)."""
    honest = read_ledger(write_planned_run(tmp_path / "run", CUSTOMERS, rounds=2) / "ledger.jsonl")
    at = next(i for i, e in enumerate(honest) if e.get("round") == 2)
    lost = {"kind": "unanswered", "round": 1, "node": "1", "reason": NO_REPLY, field: value}
    for name, entries in (
        ("mid", [*honest[:at], lost, *honest[at:]]),
        ("end", [*honest[:-1], lost, honest[-1]]),
    ):
        report = audit(copy_run(rechain([dict(e) for e in entries]), tmp_path / name))
        (problem,) = failed(report)["fields"]
        assert f"unanswered entry's {field}" in problem


def test_a_round_declined_for_budget_after_an_interruption_says_why() -> None:
    """A run interrupted mid-round and resumed spends that round twice, and its nodes decline
    the last round for their budget: the run ended saying only 'no node could train (refused
    by policy, budgets spent or no valid update)'."""
    reason = "the next release would bring epsilon to 9.120, over the budget 8.0"
    entries = [
        {"kind": "contribution", "round": 2, "node": "n1", "epsilon": 5.1, "recovered": RECOVERED},
        {"kind": "contribution", "round": 2, "node": "n1", "epsilon": 7.0},
        {"kind": "declined", "round": 3, "node": "n1", "epsilon": 7.99481, "reason": reason},
        {"kind": "declined", "round": 3, "node": "n2", "epsilon": 7.9, "reason": reason},
    ]
    said = none_trained(entries, 3)
    assert said.startswith(
        "round 3 was declined by 2 node(s) for their budget, having spent epsilon 7.995 per "
        f"customer (n1: {reason})"
    )
    assert "1 release(s) were spent in a round the run was interrupted in" in said
    assert "recovered in round 2" in said
    assert "interrupted" not in none_trained(entries[1:], 3)  # no release lost: no such story
    assert none_trained(entries, 4).startswith("no node could train")
