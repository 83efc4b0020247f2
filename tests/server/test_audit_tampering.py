"""Ledgers a server that writes them could tamper with so that epsilon is under-reported while
every entry still chains and computes: recovered entries, dropped first contributions, forged
node-level releases, dropped rounds (server/privacy/audit_signatures.py, audit_checks.py,
audit_node_level.py, audit_federation.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from server.privacy import accounting
from server.privacy.accounting import epsilon_curve, federation_guarantee
from server.privacy.audit import audit
from server.privacy.audit_federation import federation_statement
from server.privacy.audit_node_level import calibrate_node_sigma
from server.privacy.ledger import GENESIS, PrivacyLedger, entry_hash, read_ledger
from server.privacy.node_privacy import NodeLevelDP
from shared.federation.signing import NodeKey
from shared.runs.config import RunConfig
from tests.server.test_ledger_audit import copy_run, write_planned_run, write_run

CUSTOMERS = {"0": 800, "1": 1000}


def rechain(entries: list[dict]) -> list[dict]:
    """What a server with write access does after editing: renumber and re-hash the chain."""
    for i, e in enumerate(entries):
        e.update(seq=i, prev_hash=entries[i - 1]["hash"] if i else GENESIS)
        e.setdefault("time", 0.0)
        e["hash"] = entry_hash(e)
    return entries


def failed(report: dict) -> dict[str, list[str]]:
    return {c["name"]: c["problems"] for c in report["checks"] if c["status"] == "fail"}


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Path:
    keys_dir = tmp_path_factory.mktemp("keys")
    keys = {node: NodeKey.load_or_create(keys_dir / f"{node}.pem") for node in CUSTOMERS}
    return write_planned_run(tmp_path_factory.mktemp("signed"), CUSTOMERS, rounds=2, keys=keys)


def recovered(entries: list[dict], node: str, which) -> list[dict]:
    """``node``'s contributions chosen by ``which`` marked recovered, their signature gone."""
    entries = [dict(e) for e in entries]
    for e in entries:
        if e["kind"] == "contribution" and e["node"] == node and which(e):
            e["recovered"] = "spent by the node but never recorded here"
            e.pop("signature"), e.pop("key_id")
    return rechain(entries)


def test_a_recovered_contribution_needs_the_next_one_signed_and_alike(tmp_path, signed):
    entries = read_ledger(signed / "ledger.jsonl")

    def run(name: str, forged: list[dict]) -> dict:
        return audit(copy_run(forged, tmp_path / name), node_keys=signed / "node-keys")

    # the server lost node 1's round-2 training reply: its evaluation reply vouches for it
    honest = run(
        "honest",
        recovered(entries, "1", lambda e: e["round"] == 2 and e["purpose"] == "training"),
    )
    assert honest["passed"], failed(honest)
    assert any("recovered by the server" in n for n in honest["notes"])

    # every contribution of node 1 "recovered": nothing signed vouches for them
    everything = run("all", recovered(entries, "1", lambda e: True))
    problems = failed(everything)["signatures"]
    assert problems and all("recovered by the server, but" in p for p in problems)
    assert "no signed contribution after it" in problems[-1]

    # a recovered entry at twice the noise the node's signed releases carry: cheaper
    raised = recovered(entries, "1", lambda e: e["round"] == 2 and e["purpose"] == "training")
    for e in raised:
        if e.get("recovered"):
            e["noise_multiplier"] *= 2
    (problem,) = failed(run("raised", rechain(raised)))["signatures"]
    assert "not at the node's costliest signed release" in problem and "noise_multiplier" in problem


def test_dropping_each_node_first_contribution_fails_and_never_lowers_the_statement(tmp_path):
    out = write_run(tmp_path / "honest", partition="merchant", target=20.0)
    entries = read_ledger(out / "ledger.jsonl")
    kept = [e for e in entries if not (e["kind"] == "contribution" and e["round"] == 1)]
    report = audit(copy_run(rechain([dict(e) for e in kept]), tmp_path / "dropped"))
    problems = failed(report)["contribution_index"]
    assert len(problems) == 3 and "--receipts 0=PATH" in problems[0]
    assert "contributions 0 to 0 are not in this ledger" in problems[0]
    honest = [e for e in entries if e["kind"] == "contribution"]
    dropped = [e for e in kept if e["kind"] == "contribution"]
    full = federation_statement(honest, 1e-5, "merchant")["epsilon"]
    padded = federation_statement(dropped, 1e-5, "merchant")
    assert padded["missing_accounted"] == 3
    assert padded["epsilon"] >= full * (1 - 1e-3)
    assert federation_guarantee(dropped, 1e-5, "merchant")["epsilon"] < 0.95 * full  # the writer's


def node_level_ledger(out: Path, rounds: int, forge=None) -> Path:
    """A node-dp run's ledger of ``rounds`` releases (``forge`` edits each node_level entry,
    re-chained), ended with run_end."""
    config = RunConfig(node_dp=True, node_target_epsilon=1.0, dp_rounds=3, clients=2)
    out.mkdir(parents=True)
    ledger = PrivacyLedger(out / "ledger.jsonl")
    ledger.append("run_start", config=config.to_dict(), unit="u")
    node_dp = NodeLevelDP(config, ledger)
    for r in range(1, rounds + 1):
        node_dp.release(r, {"id_scores.bias": np.zeros(3, np.float32)}, 2, 2)
    ledger.append("run_end", rounds_completed=3, reason="done")
    if forge:
        entries = read_ledger(out / "ledger.jsonl")
        nl = [e for e in entries if e["kind"] == "node_level"]
        for e in nl:
            forge(e)
        for e, epsilon in zip(nl, epsilon_curve(nl), strict=True):
            e["epsilon"] = epsilon * 1.001
        copy_run(rechain(entries), out)
    return out


@pytest.mark.parametrize(
    ("name", "forge", "words"),
    [
        ("amplified", lambda e: e.update(mechanism="poisson_subsampled_gaussian", sample_rate=0.1),
         "no amplification by sampling"),
        ("inflated", lambda e: e.update(noise_multiplier=3 * e["noise_multiplier"]),
         "calibrate to σ"),
        ("delta", lambda e: e.update(delta=0.2), "not the configured node_delta"),
    ],
)  # fmt: skip
def test_node_level_entries_must_be_the_planned_mechanism(tmp_path, name, forge, words):
    assert audit(node_level_ledger(tmp_path / "honest", 3))["passed"]
    report = audit(node_level_ledger(tmp_path / name, 3, forge))
    assert list(failed(report)) == ["node_level"] and words in failed(report)["node_level"][0]


def test_a_node_dp_run_without_its_node_level_entries_fails(tmp_path):
    out = node_level_ledger(tmp_path / "gone", 3)
    entries = read_ledger(out / "ledger.jsonl")
    copy_run(rechain([e for e in entries if e["kind"] != "node_level"]), out)
    (out / "metrics.json").write_text(
        json.dumps({"privacy": {"node_level": {"epsilon": 0.01, "delta": 1e-5}}})
    )
    report = audit(out)
    assert "no node_level entry" in failed(report)["node_level"][0]
    assert "no node-level release" in failed(report)["metrics"][0]
    out = node_level_ledger(tmp_path / "short", 2)  # round 3 never released
    assert "round(s) 3 have no node_level entry" in failed(audit(out))["node_level"][0]


def test_rounds_missing_before_run_end_fail(tmp_path):
    out = write_run(tmp_path / "honest")
    entries = read_ledger(out / "ledger.jsonl")
    final = {e["node"]: e["epsilon"] for e in entries if e["kind"] == "contribution"}
    (out / "metrics.json").write_text(json.dumps({"privacy": {"per_node": final}}))
    assert audit(out)["passed"]

    kept = [e for e in entries if not (e["kind"] == "contribution" and e["round"] == 3)]
    out = copy_run(rechain([dict(e) for e in kept]), tmp_path / "tail")
    (out / "metrics.json").write_text(json.dumps({"privacy": {"epsilon": 8.0}}))
    report = failed(audit(out))
    assert len(report["rounds"]) == 3 and "round(s) 3 of the 3" in report["rounds"][0]
    assert any("no per_node epsilons" in p for p in report["metrics"])

    # a declined round is an entry: the node is accounted for
    declined = [dict(e) for e in kept]
    for node in "012":
        declined.insert(-1, {"kind": "declined", "round": 3, "node": node, "reason": "budget"})
    out = copy_run(rechain(declined), tmp_path / "declined")
    assert "rounds" not in failed(audit(out))

    empty = [e for e in entries if e["kind"] != "contribution"]
    out = copy_run(rechain([dict(e) for e in empty]), tmp_path / "empty")
    assert "holds no contribution" in failed(audit(out))["rounds"][0]


# --- structural tampering: each of these crashed the audit when fuzzed ------------------------


@pytest.fixture(scope="module")
def receipted(tmp_path_factory) -> Path:
    """A signed one-round run with the nodes' keys in OUT/node-keys and their receipt logs."""
    out = tmp_path_factory.mktemp("receipted")
    keys = {node: NodeKey.load_or_create(out / "keys" / f"{node}.pem") for node in CUSTOMERS}
    return write_planned_run(out, CUSTOMERS, rounds=1, keys=keys, receipts=out / "receipts")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"\xff\xfe", "line 3: not UTF-8 text"),
        (b"[" * 100_000, "line 3: not valid JSON (maximum recursion depth"),
        (b'{"seq": ' + b"9" * 5000 + b"}", "line 3: not valid JSON (Exceeds the limit"),
        (b"[1, 2]", "line 3: not a JSON object"),
    ],
)
def test_a_ledger_line_that_is_no_json_object_fails_the_chain_check(
    tmp_path, receipted, line, words
):
    """Invalid UTF-8, nesting past the parser's recursion limit and a number past Python's
    4300 digits raised from the ledger reader instead of failing the chain."""
    lines = (receipted / "ledger.jsonl").read_bytes().split(b"\n")
    out = tmp_path / "tampered"
    out.mkdir()
    (out / "ledger.jsonl").write_bytes(b"\n".join([*lines[:2], line, *lines[2:]]))
    report = audit(out)
    assert not report["passed"] and words in failed(report)["chain"][0]


@pytest.mark.parametrize(
    ("tamper", "check_name", "words"),
    [
        (lambda es: es[0].update(config=[1]), "fields", "line 1: run_start entry's config [1] is"),
        (lambda es: es.insert(2, {**es[0], "config": "x"}), "fields", "line 3: run_start entry's"),
        (lambda es: es[1].update(kind=["contribution"]), "fields", "line 2: kind ['contribution'"),
        (lambda es: es[1].update(round=-(10**9)), "recomputed", "round -1000000000 is not a round"),
        (lambda es: es[1].update(node="x" * 300), "signatures", "(File name too long)"),
    ],
)  # fmt: skip
def test_an_entry_of_the_wrong_shape_fails_a_check(tmp_path, receipted, tamper, check_name, words):
    """A later run_start whose config is not an object and a kind that is a list raised; a
    contribution of round -10^9 made the rounds check list 10^9 rounds (out of memory); a node
    name too long for a file raised from the key lookup. The first run_start's config that is not
    an object was read as an empty config, passing the fields check."""
    entries = read_ledger(receipted / "ledger.jsonl")
    tamper(entries)
    out = copy_run(rechain(entries), tmp_path / "tampered")
    report = audit(out, node_keys=receipted / "node-keys")
    assert not report["passed"] and any(words in p for p in failed(report)[check_name])


@pytest.mark.parametrize("value", [[1], -(10**9)])
def test_a_node_level_round_that_is_no_round_fails_the_node_level_check(tmp_path, value):
    entries = read_ledger(node_level_ledger(tmp_path / "honest", 3) / "ledger.jsonl")
    entries[1]["round"] = value
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert f"line 2: round {value!r} is not a round number" in failed(report)["node_level"][0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b'{"privacy": [1]}', "its privacy is not a JSON object but '[1]'"),
        (b'{"privacy": 7}', "its privacy is not a JSON object but '7'"),
        (b'{"privacy": {"node_level": "x"}}', "its node_level is not a JSON object"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[" * 100_000, "not valid JSON (maximum recursion depth"),
    ],
)
def test_a_malformed_metrics_json_fails_the_metrics_check(tmp_path, receipted, text, words):
    out = copy_run(read_ledger(receipted / "ledger.jsonl"), tmp_path / "run")
    (out / "metrics.json").write_bytes(text)
    report = audit(out)
    (problem,) = failed(report)["metrics"]
    assert problem.startswith(f"{out / 'metrics.json'}: {words}")


def test_malformed_receipts_and_indices_fail_the_receipts_check(tmp_path, receipted):
    """A receipt line nested past the parser's recursion limit raised; so did a ledger
    contribution_index that is a list, audited with receipts."""
    logs = {node: receipted / "receipts" / f"{node}.jsonl" for node in CUSTOMERS}
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(logs["0"].read_bytes() + b"[" * 100_000 + b"\n")
    report = audit(receipted, receipts={**logs, "0": deep})
    assert failed(report)["receipts"] == [
        f"node 0: {deep}: line 3: not valid JSON (maximum recursion depth exceeded while "
        "decoding a JSON array from a unicode string)"
    ]
    entries = read_ledger(receipted / "ledger.jsonl")
    entries[1]["contribution_index"] = [0]
    report = audit(copy_run(rechain(entries), tmp_path / "listed"), receipts=logs)
    assert "line 2: contribution_index is not an integer" in failed(report)["contribution_index"][0]
    assert (
        "node 0, round 1: its receipt (contribution_index 0) is not in the ledger"
        in (failed(report)["receipts"][0])
    )


def test_a_target_no_run_plans_fails_calibration_instead_of_calibrating_for_it(tmp_path, receipted):
    """Found rerunning the type fuzzer: a training contribution stating target_epsilon 1e308
    made the calibration check search for the noise that spends it, down to σ = 0.001, whose
    PLD took hours."""
    entries = read_ledger(receipted / "ledger.jsonl")
    entries[1]["target_epsilon"] = 1e308
    started = time.monotonic()
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert time.monotonic() - started < 60
    assert failed(report)["calibration"] == [
        "node 0, line 2 (round 1): target_epsilon 1e+308 is outside (0, 100]: no run plans it"
    ]


def test_a_run_target_no_run_plans_fails_instead_of_splitting_it(tmp_path, monkeypatch):
    """A merchant run's start stating target_epsilon 1e308 (every node's entries fine) made
    the federation check split that budget over the nodes' plans, calibrating down to σ =
    0.001: the audit ran for hours. It fails the check without splitting."""
    out = write_planned_run(tmp_path / "run", CUSTOMERS, 1, 4.0, "merchant", asked=2.0)
    entries = read_ledger(out / "ledger.jsonl")
    entries[0]["config"]["target_epsilon"] = 1e308

    def split_budget(*args):
        raise AssertionError("split_budget called for a target no run plans")

    monkeypatch.setattr("server.privacy.accounting.split_budget", split_budget)
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert failed(report)["federation_budget"] == [
        "run_start's target_epsilon 1e+308 is not a number in (0, 100]: no run plans it"
    ]


def test_a_ledger_without_its_run_start_fails_and_is_audited_as_private(tmp_path, receipted):
    """A ledger whose run_start was removed read as a run with dp off: a ledger of unanswered
    private requests passed with "only the chain is checked". Without it the run's settings
    are unknown: the fields check fails, and every release is still recomputed and composed,
    at the nodes' own deltas, for a customer at every node."""
    honest = audit(receipted)
    entries = read_ledger(receipted / "ledger.jsonl")
    report = audit(copy_run(rechain([dict(e) for e in entries[1:]]), tmp_path / "headless"))
    assert "no run_start entry" in failed(report)["fields"][-1]
    assert report["dp"] is None and "dp off" not in report["guarantee"]
    recomputed = {n["node"]: n["pld_epsilon"] for n in report["nodes"]}
    assert recomputed == {n["node"]: n["pld_epsilon"] for n in honest["nodes"]}
    assert report["federation"]["applies"] == "all_nodes"
    assert report["federation"]["epsilon"] >= max(e.get("epsilon", 0) for e in entries)

    unanswered = tmp_path / "unanswered"
    unanswered.mkdir()
    ledger = PrivacyLedger(unanswered / "ledger.jsonl")
    ledger.append("unanswered", round=1, node="0", reason="no reply")
    ledger.append("run_end", rounds_completed=1, reason="done")
    report = audit(unanswered)
    assert "no run_start entry" in failed(report)["fields"][-1]
    assert report["federation"]["unbounded"] == ["0"]
    assert report["federation"]["epsilon"] == float("inf")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("unit", "one example", "unit 'one example', not the customer level"),
        ("unit", "one event of one customer", "not the customer level"),
        ("accountant", "rdp", "accountant 'rdp', not prv or pld"),
        ("accountant", ["prv"], "accountant ['prv'], not prv or pld"),
        ("steps", 0, "0 steps: a release that spends nothing, yet claims its round"),
        # a DP-SGD release at sample rate 0 recomputed to a spend of 0 and passed every check
        # but the calibration's, which needs a plan in the ledger
        ("sample_rate", 0.0, "sample_rate 0.0 is outside (0, 1]"),
        ("sample_rate", 1.5, "sample_rate 1.5 is outside (0, 1]"),
        ("delta", 1.0, "delta 1.0 is outside (0, 1)"),
        ("noise_multiplier", 1e-4, "noise_multiplier 0.0001 is outside [0.001, 1e+06]"),
        ("epsilon", -1.0, "epsilon -1.0 is no finite number >= 0"),
    ],
)
def test_a_release_the_recomputation_does_not_cover_fails_the_releases_check(
    tmp_path, receipted, field, value, words
):
    """A release stating another unit than one customer's, an accountant the audit does not
    know, no steps at all (it spends nothing, yet claims a training round), or a sample rate,
    delta, noise or epsilon outside what an accountant recomputes honestly was read without a
    failed check."""
    assert {c["name"]: c["status"] for c in audit(receipted)["checks"]}["releases"] == "pass"
    entries = read_ledger(receipted / "ledger.jsonl")
    entries[1][field] = value
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    (problem,) = failed(report)["releases"]
    assert problem.startswith("node 0, line 2 (round 1): ") and words in problem


def test_a_release_no_run_spends_fails_before_any_pld_is_built(tmp_path, receipted, monkeypatch):
    """A contribution edited to noise 0.001 (within the noise bounds) crashed the audit: PLD
    asked for 38 GiB for its one privacy loss distribution. Its RDP bound, which costs
    microseconds, is above what any release of any run spends: it fails without a PLD."""
    entries = read_ledger(receipted / "ledger.jsonl")
    entries[1]["noise_multiplier"] = 1e-3
    pld = accounting.event_pld

    def bounded_pld(mechanism, sigma, *args):
        assert sigma > 0.01, f"PLD asked for noise {sigma}"
        return pld(mechanism, sigma, *args)

    monkeypatch.setattr(accounting, "event_pld", bounded_pld)
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    (problem,) = failed(report)["recomputed"]
    assert problem.startswith("node 0, line 2: spends epsilon") and "RDP bound" in problem
    assert report["guarantee"].startswith("not established")


@pytest.mark.parametrize(
    ("tamper", "check_name"),
    [
        (lambda es: es[1].update(delta=10**400), "recomputed"),
        (lambda es: es[1].update(noise_multiplier=10**400), "recomputed"),
        (lambda es: es[1].update(num_customers=10**400), "delta"),
        (lambda es: es[0]["config"].update(dp_batch_size=10**400), "calibration"),
        (lambda es: es[0]["config"].update(target_epsilon=10**400), "federation_budget"),
        (lambda es: es[0]["config"].update(target_epsilon="8"), "federation_budget"),
    ],
)  # fmt: skip
def test_a_number_no_float_holds_fails_a_check_instead_of_crashing(
    tmp_path, receipted, tamper, check_name
):
    """An integer of 400 digits is valid JSON (below the parser's 4,300) and no float: in a
    contribution's delta or noise multiplier, or the config's batch, it raised OverflowError
    from the audit; as the run's target (or as text) it skipped the federation_budget check."""
    entries = read_ledger(receipted / "ledger.jsonl")
    tamper(entries)
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert failed(report)[check_name]


CANARY = '"included": [1, 0], "num_canaries": 2, "score": "s"'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"\xff\xfe", "not UTF-8 text"),
        (b"[" * 100_000, "not valid JSON (maximum recursion depth"),
        (b"scores", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"scores included num_canaries score"', "not a JSON object"),
        (b'{"scores": [1, 2]}', "missing included, num_canaries, score"),
        (b'{"scores": 5, ' + CANARY.encode() + b"}", "scores must be a list of finite numbers"),
        (b'{"scores": [NaN, 1], ' + CANARY.encode() + b"}", "scores must be a list of finite"),
        (b'{"scores": [1e400, 1], ' + CANARY.encode() + b"}", "scores must be a list of finite"),
        (b'{"scores": [1' + b"0" * 400 + b", 1], " + CANARY.encode() + b"}", "scores must be"),
        (b'{"scores": [1, 2], "included": [1, 0.5], "num_canaries": 2, "score": "s"}',
         "included must be a list of 0 or 1"),
        (b'{"scores": [1, 2], "included": [1, 0], "num_canaries": 3, "score": "s"}',
         "scores, included and num_canaries disagree in length"),
    ],
)  # fmt: skip
def test_a_malformed_canaries_json_fails_the_empirical_check(tmp_path, receipted, text, words):
    """canaries.json had a reader of its own: invalid UTF-8, nesting past the recursion limit,
    a JSON string holding the field names, scores that are no list or an integer no float
    holds raised from the audit; NaN scores and a flag of 0.5 (read as 0) gave a bound."""
    out = copy_run(read_ledger(receipted / "ledger.jsonl"), tmp_path / "run")
    (out / "canaries.json").write_bytes(text)
    (problem,) = failed(audit(out))["empirical"]
    assert problem.startswith(f"{out / 'canaries.json'}: {words}")


def test_a_run_delta_no_node_used_does_not_lower_the_audits_statement(tmp_path, signed):
    """A run's start stating delta 0.5, above every node's own (which each node took, the
    smaller): every contribution is within it, and the audit stated the composition over the
    nodes at 0.5, 3.99 against 4.93 at their own deltas, and passed the target 4 the honest
    ledger fails. A delta no node used is not used: the statement is the one at the nodes'
    own."""
    entries = [dict(e) for e in read_ledger(signed / "ledger.jsonl")]
    entries[0]["config"] = {**entries[0]["config"], "partition": "merchant"}
    honest = audit(copy_run(rechain(entries), tmp_path / "honest"), node_keys=signed / "node-keys")
    entries[0]["config"] = {**entries[0]["config"], "delta": 0.5}
    raised = audit(copy_run(rechain(entries), tmp_path / "raised"), node_keys=signed / "node-keys")
    fed, own = raised["federation"], honest["federation"]
    assert fed["applies"] == own["applies"] == "all_nodes"
    assert fed["epsilon"] == own["epsilon"]
    assert fed["all_nodes"]["delta"] == own["all_nodes"]["delta"] < 1 / sum(CUSTOMERS.values())
    assert "federation_budget" in failed(honest) and "federation_budget" in failed(raised)


def test_metrics_json_stating_a_smaller_delta_or_no_number_fails(tmp_path, receipted):
    """metrics.json's statement at the recomputed epsilon but a delta far below the
    guarantee's (1e-12: at it the epsilon is far larger) passed, as did an epsilon written as
    text; only a delta above the guarantee's failed."""
    out = copy_run(read_ledger(receipted / "ledger.jsonl"), tmp_path / "run")
    report = audit(out)
    fed = report["federation"]
    per_node = {n["node"]: n["reported_epsilon"] for n in report["nodes"]}
    established = fed[fed["applies"]]["delta"]

    def problems(**privacy) -> list[str]:
        statement = {"privacy": {**privacy, "per_node": per_node}}
        (out / "metrics.json").write_text(json.dumps(statement))
        return failed(audit(out)).get("metrics", [])

    assert problems(epsilon=fed["epsilon"], delta=established) == []
    (small,) = problems(epsilon=fed["epsilon"], delta=1e-12)
    assert small.startswith("metrics.json states delta 1e-12, below the guarantee's")
    assert problems(epsilon=str(fed["epsilon"] / 10), delta=established) == [
        f"metrics.json's epsilon '{fed['epsilon'] / 10}' is not a number"
    ]
    assert problems(epsilon=fed["epsilon"], delta="1e-12") == [
        "metrics.json's delta '1e-12' is not a number"
    ]
    (bare,) = problems(epsilon=fed["epsilon"])  # an epsilon alone reads as pure DP
    assert bare.startswith("metrics.json states an epsilon without its delta")


def test_a_node_delta_not_below_one_over_the_nodes_fails_the_node_level_check(tmp_path):
    """A node-dp run's start stating node_delta 0.5 over 2 nodes, each release at that delta
    and at the noise it calibrates to: every entry agreed with the plan and the check passed,
    for a guarantee that publishing one node's update outright meets."""
    sigma = calibrate_node_sigma(1.0, 0.5, 3)
    out = node_level_ledger(
        tmp_path / "run", 3, lambda e: e.update(delta=0.5, noise_multiplier=sigma)
    )
    entries = read_ledger(out / "ledger.jsonl")
    entries[0]["config"] = {**entries[0]["config"], "node_delta": 0.5}
    report = audit(copy_run(rechain(entries), tmp_path / "loose"))
    assert failed(report)["node_level"] == [
        "the configured node_delta 0.5 is not below 1/2 nodes: at it, publishing one node's "
        "update outright meets the node-level guarantee"
    ]


def test_a_node_erased_from_the_ledger_is_warned_of_where_its_key_is_given(tmp_path, signed):
    """Every entry of node 1 removed and the rest chained again: the run's first entry keeps
    its hash, node 0's signatures still verify, and the composition left node 1's spending
    out, with nothing in the audit saying so although the auditor held node 1's key."""
    entries = read_ledger(signed / "ledger.jsonl")
    honest = audit(copy_run(entries, tmp_path / "honest"), node_keys=signed / "node-keys")
    kept = [dict(e) for e in entries if e.get("node") != "1"]
    erased = audit(copy_run(rechain(kept), tmp_path / "erased"), node_keys=signed / "node-keys")
    assert (
        erased["federation"]["all_nodes"]["epsilon"] < honest["federation"]["all_nodes"]["epsilon"]
    )
    assert "signatures" not in failed(erased)
    checks = {c["name"]: c for c in erased["checks"]}
    assert checks["absent_nodes"]["status"] == "warn"
    assert checks["absent_nodes"]["problems"][0] == (
        f"node 1: its key is in {signed / 'node-keys'}, but no ledger entry names it: it never "
        "took part, or its entries were removed (its spending is then in no statement here): "
        "check its receipts (--receipts 1=PATH)"
    )
    assert [c["status"] for c in honest["checks"] if c["name"] == "absent_nodes"] == ["pass"]
    # without the node's key: the run's start declares the nodes the ledger must name
    unkeyed = audit(copy_run(rechain(kept), tmp_path / "unkeyed"), node_keys=tmp_path / "none")
    assert [c["problems"] for c in unkeyed["checks"] if c["name"] == "absent_nodes"] == [
        [
            f"the run's start declares {len(CUSTOMERS)} node(s), the ledger names "
            f"{len(CUSTOMERS) - 1}: the other 1 never took part (never sampled, never "
            "connected), or their entries were removed, their spending then in no statement "
            "here; ask each merchant of the federation for its receipts (--receipts NODE=PATH)"
        ]
    ]
