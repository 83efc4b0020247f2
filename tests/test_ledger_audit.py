"""The privacy ledger, its audit and the one-run empirical bound (server/ledger.py,
server/accounting.py, server/audit.py, server/canary_audit.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from server.accounting import (
    contributions_to_dp_event,
    federation_guarantee,
    recompute_epsilon,
)
from server.canary_audit import epsilon_lower_bound, write_canaries
from server.ledger import LedgerError, PrivacyLedger, entry_hash, read_ledger, verify_chain
from shared.cli import main

DELTA = 1e-5
SIGMA, RATE, STEPS = 1.0, 0.02, 50


def prv_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """What a node's Opacus PRV accountant reports after ``history`` of (sigma, q, steps)."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(s, q, n) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta)


def write_run(
    out: Path,
    nodes=("0", "1", "2"),
    rounds: int = 3,
    target: float = 8.0,
    partition: str = "regional",
    scale: dict | None = None,
    dp: bool = True,
) -> Path:
    """An honest federated run's ledger: every node contributes each round, epsilon from PRV;
    ``scale[node]`` multiplies that node's reported epsilon (a dishonest ledger)."""
    ledger = PrivacyLedger(out / "ledger.jsonl")
    config = {
        "target_epsilon": target,
        "delta": DELTA,
        "num_nodes": len(nodes),
        "rounds": rounds,
        "partition": partition,
        "dp": dp,
    }
    ledger.append("run_start", config=config, unit="one customer's data at one node")
    history: dict[str, list] = {n: [] for n in nodes}
    for r in range(1, rounds + 1 if dp else 1):
        for node in nodes:
            history[node].append((SIGMA, RATE, STEPS))
            epsilon = prv_epsilon(history[node]) * (scale or {}).get(node, 1.0)
            ledger.append(
                "contribution",
                round=r,
                node=node,
                contribution_index=r - 1,
                mechanism="poisson_subsampled_gaussian",
                noise_multiplier=SIGMA,
                sample_rate=RATE,
                steps=STEPS,
                max_grad_norm=1.0,
                delta=DELTA,
                epsilon=epsilon,
                accountant="prv",
                unit="one customer's data at one node",
                target_epsilon=target,
                num_customers=500,
            )
    ledger.append("run_end", rounds_completed=rounds, reason="done")
    return out


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> list[dict]:
    out = write_run(tmp_path_factory.mktemp("honest"))
    return read_ledger(out / "ledger.jsonl")


def copy_run(entries: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return out


# --- the hash chain --------------------------------------------------------------------------


def test_intact_chain_has_no_problems(honest):
    assert verify_chain(honest) == []
    assert [e["seq"] for e in honest] == list(range(len(honest)))
    assert all(e["hash"] == entry_hash(e) for e in honest)


def test_chain_names_an_edited_line(honest):
    entries = [dict(e) for e in honest]
    entries[4]["epsilon"] = 0.01
    assert verify_chain(entries) == ["line 5: content edited (hash mismatch)"]
    entries[4]["hash"] = entry_hash(entries[4])  # a forger who re-hashes the edited line
    assert verify_chain(entries) == [
        "line 6: prev_hash does not match line 5's hash: the line before it was replaced, "
        "or edited and re-hashed"
    ]


def test_chain_names_a_removed_line(honest):
    problems = verify_chain(honest[:6] + honest[7:])
    assert problems == ["line 7: seq 7 follows 5: 1 entry was removed before it"]
    assert "removed" in verify_chain(honest[1:])[0]


def test_chain_names_an_inserted_line(honest):
    forged = dict(honest[4], epsilon=0.01)
    forged["hash"] = entry_hash(forged)
    assert verify_chain(honest[:4] + [forged] + honest[4:]) == [
        "line 5: inserted (line 6 continues the chain from line 4)"
    ]
    assert verify_chain(honest[:8] + [honest[2]] + honest[8:]) == [
        "line 9: inserted (line 10 continues the chain from line 8)"
    ]


def test_chain_names_two_swapped_lines(honest):
    entries = list(honest)
    entries[3], entries[4] = entries[4], entries[3]
    assert verify_chain(entries) == ["lines 4 and 5 swapped"]
    entries = list(honest)
    entries[2], entries[7] = entries[7], entries[2]
    assert verify_chain(entries) == ["lines 3 and 8 swapped"]


def test_resume_continues_a_valid_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    first = PrivacyLedger(path)
    first.append("run_start", config={"dp": True, "delta": DELTA}, unit="u")
    first.append("declined", round=1, node="a", reason="budget")
    resumed = PrivacyLedger(path)
    entry = resumed.append("run_end", rounds_completed=1, reason="done")
    assert entry["seq"] == 2 and entry["prev_hash"] == first.entries[-1]["hash"]
    entries = read_ledger(path)
    assert len(entries) == 3 and verify_chain(entries) == []


def test_resume_refuses_a_broken_chain(tmp_path, honest):
    out = copy_run(honest[:3] + honest[4:], tmp_path)
    with pytest.raises(LedgerError, match="refusing to append.*line 4.*removed"):
        PrivacyLedger(out / "ledger.jsonl")
    (out / "ledger.jsonl").write_text(json.dumps(honest[0]) + '\n{"seq": 1, \n')
    with pytest.raises(LedgerError, match="line 2: not valid JSON"):
        PrivacyLedger(out / "ledger.jsonl")


def test_append_refuses_incomplete_entries(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="needs .*epsilon"):
        ledger.append("contribution", round=1, node="a")
    with pytest.raises(ValueError, match="unknown ledger entry kind"):
        ledger.append("note", text="hi")
    assert not (tmp_path / "ledger.jsonl").exists()


# --- accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma, rate, steps", [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.2, 50), (1.0, 0.02, 250)]
)
def test_pld_recomputation_agrees_with_opacus_prv(sigma, rate, steps):
    contribution = {
        "mechanism": "poisson_subsampled_gaussian",
        "noise_multiplier": sigma,
        "sample_rate": rate,
        "steps": steps,
    }
    pld = recompute_epsilon([contribution], DELTA)
    prv = prv_epsilon([(sigma, rate, steps)])
    assert abs(prv - pld) / pld < 0.05
    assert prv >= pld * 0.99  # an honest PRV ledger is never flagged at the default tolerance


def test_recompute_equals_dp_accounting_pld_accountant():
    from dp_accounting.pld import PLDAccountant

    cs = [
        {
            "mechanism": "poisson_subsampled_gaussian",
            "noise_multiplier": s,
            "sample_rate": q,
            "steps": n,
        }
        for s, q, n in [(1.0, 0.02, 50), (1.2, 0.05, 20), (1.0, 0.02, 50)]
    ]
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(contributions_to_dp_event(cs))
    assert recompute_epsilon(cs, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)


def test_federation_guarantee_one_node_is_max_all_nodes_composes(honest):
    cs = [e for e in honest if e["kind"] == "contribution"]
    regional = federation_guarantee(cs, DELTA, "regional")
    merchant = federation_guarantee(cs, DELTA, "merchant")
    per_node = regional["per_node"]
    assert regional["epsilon"] == max(per_node.values())
    assert max(per_node.values()) < merchant["epsilon"] < sum(per_node.values())
    assert merchant["all_nodes"]["basic_composition"]["delta"] == pytest.approx(3 * DELTA)


# --- fedrec audit ----------------------------------------------------------------------------


def test_audit_passes_an_honest_run_and_writes_reports(tmp_path, honest, capsys):
    out = copy_run(honest, tmp_path)
    assert main(["audit", str(out)]) == 0
    assert "audit passed" in capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())
    assert report["passed"] and {n["node"] for n in report["nodes"]} == {"0", "1", "2"}
    page = (out / "audit.html").read_text()
    assert "data:image/png;base64," in page
    assert all(f"<td>{node}</td>" in page for node in ("0", "1", "2"))
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_audit_flags_a_node_reporting_epsilon_20_percent_too_low(tmp_path, capsys):
    out = write_run(tmp_path, nodes=("north", "south"), rounds=2, scale={"south": 0.8})
    assert main(["audit", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "node south" in printed and "node north" not in printed
    report = json.loads((out / "audit.json").read_text())
    statuses = {n["node"]: n["status"] for n in report["nodes"]}
    assert statuses == {"north": "ok", "south": "ε too low"}
    south = next(n for n in report["nodes"] if n["node"] == "south")
    assert south["rel_diff"] == pytest.approx(-0.2, abs=0.02)


def test_audit_flags_an_over_budget_node(tmp_path, capsys):
    out = write_run(tmp_path, rounds=2, target=1.2)
    assert main(["audit", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    budget = next(c for c in report["checks"] if c["name"] == "budget")
    assert not budget["passed"] and "node 0: final epsilon" in budget["problems"][0]


def test_audit_flags_tampering_gaps_and_a_large_delta(tmp_path, honest):
    entries = [dict(e) for e in honest]
    dropped = entries[:5] + entries[6:]  # removes node 1's round-2 contribution
    out = copy_run(dropped, tmp_path / "gap")
    assert main(["audit", str(out)]) == 1
    failed = {
        c["name"] for c in json.loads((out / "audit.json").read_text())["checks"] if not c["passed"]
    }
    assert failed == {"chain", "contribution_index"}

    ledger = PrivacyLedger(tmp_path / "delta" / "ledger.jsonl")
    for e in honest[:-1]:
        fields = {
            k: v for k, v in e.items() if k not in ("seq", "kind", "time", "prev_hash", "hash")
        }
        if e["kind"] == "contribution" and e["node"] == "2":
            fields["delta"] = 1e-3
        ledger.append(e["kind"], **fields)
    assert main(["audit", str(tmp_path / "delta")]) == 1
    checks = json.loads((tmp_path / "delta" / "audit.json").read_text())["checks"]
    assert [c["name"] for c in checks if not c["passed"]] == ["delta"]


def test_audit_of_a_missing_or_empty_ledger_exits_2(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    (tmp_path / "ledger.jsonl").write_text("")
    assert main(["audit", str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err


def test_audit_of_a_non_dp_run_says_there_is_no_guarantee(tmp_path, capsys):
    out = write_run(tmp_path, dp=False)
    assert main(["audit", str(out)]) == 0
    assert "no formal guarantee" in capsys.readouterr().out


# --- the one-run empirical bound -------------------------------------------------------------


def test_separable_canaries_give_a_clearly_positive_bound():
    rng = np.random.default_rng(0)
    included = rng.integers(0, 2, 1000)
    result = epsilon_lower_bound(included + rng.normal(0, 0.01, 1000), included)
    assert result["epsilon_lower_bound"] > 1


def test_random_scores_give_about_zero():
    rng = np.random.default_rng(1)
    included = rng.integers(0, 2, 1000)
    assert epsilon_lower_bound(rng.normal(size=1000), included)["epsilon_lower_bound"] <= 0.3


def randomized_response(seed: int, epsilon: float = 1.0, m: int = 2000):
    """Canaries whose score is an epsilon-DP randomized response of their membership."""
    rng = np.random.default_rng(seed)
    included = rng.integers(0, 2, m)
    truthful = rng.random(m) < np.exp(epsilon) / (1 + np.exp(epsilon))
    return np.where(truthful, included, 1 - included) + rng.normal(0, 1e-3, m), included


def test_bound_never_exceeds_a_true_epsilon_dp_mechanism():
    assert epsilon_lower_bound(*randomized_response(0))["epsilon_lower_bound"] <= 1.0
    # 95% confidence: over 100 runs it may exceed epsilon about 5 times, not more
    bounds = [
        epsilon_lower_bound(*randomized_response(s))["epsilon_lower_bound"] for s in range(100)
    ]
    assert sum(b > 1.0 for b in bounds) <= 10 and np.median(bounds) > 0.5


def test_delta_only_lowers_the_bound():
    scores, included = randomized_response(3, epsilon=3.0)
    pure = epsilon_lower_bound(scores, included)["epsilon_lower_bound"]
    approx = epsilon_lower_bound(scores, included, delta=1e-4)["epsilon_lower_bound"]
    assert 0 < approx < pure


def test_audit_reports_the_empirical_section(tmp_path, honest):
    out = copy_run(honest, tmp_path)
    scores, included = randomized_response(0, epsilon=0.5, m=500)
    write_canaries(out / "canaries.json", scores.tolist(), included.tolist(), "minus the loss")
    assert main(["audit", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["empirical"]["epsilon_lower_bound"] <= report["federation"]["epsilon"]
    page = (out / "audit.html").read_text()
    assert "Empirical audit" in page and page.count("data:image/png;base64,") == 2


def test_a_cut_off_ledger_is_caught_by_metrics_json(tmp_path, honest):
    final = {e["node"]: e["epsilon"] for e in honest if e["kind"] == "contribution"}
    out = copy_run(honest[:-4], tmp_path)  # the last round and run_end cut off: chain intact
    (out / "metrics.json").write_text(json.dumps({"privacy": {"per_node": final}}))
    assert main(["audit", str(out)]) == 1
    checks = json.loads((out / "audit.json").read_text())["checks"]
    assert [c["name"] for c in checks if not c["passed"]] == ["metrics"]


def test_node_level_epsilon_claiming_amplification_is_flagged(tmp_path, honest):
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    def node_level_run(out: Path, epsilon_of) -> Path:
        ledger = PrivacyLedger(out / "ledger.jsonl")
        ledger.append("run_start", config={"dp": False, "delta": DELTA}, unit="u")
        for r in range(1, 4):
            ledger.append(
                "node_level",
                round=r,
                mechanism="gaussian",
                noise_multiplier=2.0,
                sample_rate=0.5,
                steps=1,
                clipping_norm=1.0,
                delta=DELTA,
                epsilon=epsilon_of(r),
                accountant="rdp",
                unit="one node's participation",
            )
        return out

    def rdp(r: int) -> float:  # no amplification: what fixed-size node sampling allows
        accountant = RdpAccountant()
        accountant.compose(SelfComposedDpEvent(GaussianDpEvent(2.0), r))
        return accountant.get_epsilon(DELTA)

    out = node_level_run(tmp_path / "honest", rdp)
    assert main(["audit", str(out)]) == 0
    assert json.loads((out / "audit.json").read_text())["node_level"]["rounds"] == 3
    out = node_level_run(tmp_path / "amplified", lambda r: rdp(r) * 0.5)
    assert main(["audit", str(out)]) == 1
