"""The privacy ledger, its audit and the one-run empirical bound (server/privacy/ledger.py,
server/privacy/accounting.py, server/privacy/audit.py, server/privacy/canary_audit.py)."""

from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from server.federation.resume import require_ledger, resume_problem
from server.privacy.accounting import (
    NodePlan,
    calibrate_noise,
    contributions_to_dp_event,
    epsilon_curve,
    federation_guarantee,
    plan_steps,
    rdp_epsilon,
    recompute_epsilon,
    split_budget,
)
from server.privacy.audit import audit
from server.privacy.audit_checks import node_share
from server.privacy.audit_report import epsilon_figure, write_html
from server.privacy.canary_audit import (
    canaries_needed,
    epsilon_lower_bound,
    max_reachable,
    write_canaries,
)
from server.privacy.ledger import (
    RESERVED,
    LedgerError,
    PrivacyLedger,
    entry_hash,
    ledger_head,
    read_ledger,
    unpinned,
    verify_chain,
)
from shared.federation.reports import PRIVACY_UNIT
from shared.federation.signing import NodeKey, append_receipt, digest_arrays, signed_payload
from simulations.cli import main

DELTA = 1e-5
SIGMA, RATE, STEPS = 1.0, 0.02, 50


@functools.cache  # every node of write_run's runs has the same history: computed once
def prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float = DELTA) -> float:
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
            epsilon = prv_epsilon(tuple(history[node])) * (scale or {}).get(node, 1.0)
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
                unit=PRIVACY_UNIT,
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


def test_a_ledger_removed_cut_or_replaced_since_the_checkpoint_is_named(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.append("run_start", config={"dp": True, "delta": DELTA}, unit="u")
    ledger.append("declined", round=1, node="a", reason="budget")
    head = ledger_head(ledger.entries)
    ledger.append("declined", round=2, node="a", reason="budget")  # after the checkpoint: fine
    assert unpinned(path, head) is None
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0])  # the tail cut: the chain alone cannot tell
    assert "ends at entry 0, before entry 1" in unpinned(path, head)
    path.unlink()
    assert "missing" in unpinned(path, head)
    other = PrivacyLedger(path)  # a new ledger of the same length
    other.append("run_start", config={"dp": True, "delta": DELTA}, unit="u")
    other.append("declined", round=1, node="b", reason="budget")
    assert "not the one pinned" in unpinned(path, head)


@pytest.mark.parametrize("pin", [[0, "hash"], "entry 1", 1, {"seq": True, "hash": "x"}])
def test_a_checkpoints_edited_ledger_pin_is_named_not_a_crash(tmp_path, pin):
    """The pin is read from a file anyone with the output folder can edit: whatever it holds,
    the resume is refused with a reason (a list or a string was an AttributeError)."""
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.append("run_start", config={"dp": True, "delta": DELTA}, unit="u")
    ledger.append("declined", round=1, node="a", reason="budget")
    assert "pin" in unpinned(path, pin)


@pytest.mark.parametrize(
    ("progress", "words"),
    [
        ({"round": 2, "history": []}, "(it pins no ledger entry: written before checkpoints"),
        ({"round": 2, "ledger": None}, "(it pins no ledger entry: written before checkpoints"),
        ({"ledger": {"seq": 0, "hash": "forged"}}, "after round None"),
        ([2, "rounds"], "its progress is not a JSON object"),
    ],
)
def test_a_checkpoint_without_its_ledger_pin_is_not_resumed(tmp_path, progress, words):
    """Every saved round pins the ledger's last entry; a checkpoint without a pin (edited)
    was resumed unchecked, so a ledger removed beside it went unnoticed and the resumed run
    under-reported the rounds before it; an edited progress without its round crashed."""
    PrivacyLedger(tmp_path / "ledger.jsonl").append("run_start", config={"dp": True}, unit="u")
    (tmp_path / "checkpoint.safetensors").write_bytes(
        safetensors_bytes({"model/a": torch.zeros(2)}, {"progress": json.dumps(progress)})
    )
    with pytest.raises(SystemExit, match=re.escape(words)):
        require_ledger(tmp_path)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s, p: s.pop("b"), "not this model's (['b'])"),
        (lambda s, p: s.update(b=torch.zeros(3)), "other shapes than this model's (['b'])"),
        (lambda s, p: s["a"].fill_(float("nan")), "NaN or infinity (['a'])"),
        (lambda s, p: p.update(round="2"), "its round is '2'"),
        (lambda s, p: p.update(history={}), "history is not a list"),
        (lambda s, p: p.update(trained_rows=[0, 5]), "rows of the catalog's 5 products"),
        (lambda s, p: p.update(trained_rows=[-1]), "rows of the catalog's 5 products"),
        (lambda s, p: p.update(trained_rows=[True]), "rows of the catalog's 5 products"),
        (lambda s, p: p.update(counts={"a": [[5], [1]]}), "item counts of the catalog's 5"),
        (lambda s, p: p.update(counts={"a": [[0], [-1]]}), "item counts of the catalog's 5"),
        (lambda s, p: p.update(counts={"a": [[0, 1], [1]]}), "item counts of the catalog's 5"),
        (lambda s, p: p.update(counts={"a": 3}), "item counts of the catalog's 5"),
        (lambda s, p: p.update(counts=[]), "item counts of the catalog's 5"),
        # from the review: past int64 it crashed the resume; past a node's most customers
        # (MAX_CUSTOMERS, as a reply is held to) the nodes' sum wrapped round to negative
        (lambda s, p: p.update(counts={"a": [[0], [10**30]]}), "item counts of the catalog's 5"),
        (lambda s, p: p.update(counts={"a": [[0], [2**62]]}), "item counts of the catalog's 5"),
    ],
)
def test_a_checkpoint_edited_or_of_another_model_is_named_not_resumed(edit, words):
    """An edited checkpoint (rows past the catalog, weights of other shapes) crashed the
    resumed run with an IndexError deep in its first round."""
    model = {"a": torch.zeros(5, 2), "b": torch.zeros(2)}
    state = {name: value.clone() for name, value in model.items()}
    progress = {"round": 1, "history": [{}], "trained_rows": [0, 4], "counts": {"a": [[4], [2]]}}
    assert resume_problem(state, progress, model, num_items=5) is None
    edit(state, progress)
    assert words in resume_problem(state, progress, model, num_items=5)


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
    prv = prv_epsilon(((sigma, rate, steps),))
    assert abs(prv - pld) / pld < 0.05
    assert prv >= pld * 0.99  # an honest PRV ledger is never flagged at the default tolerance


def test_recompute_equals_dp_accounting_pld_accountant():
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

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
    # RDP composes by adding: the equal releases composed once, their steps added, are the same
    rdp = RdpAccountant()
    rdp.compose(contributions_to_dp_event(cs))
    with_gaussian = [*cs, {**cs[0], "mechanism": "gaussian", "noise_multiplier": 20.0, "steps": 1}]
    assert rdp_epsilon(cs, DELTA) == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    rdp = RdpAccountant()
    rdp.compose(contributions_to_dp_event(with_gaussian))
    assert rdp_epsilon(with_gaussian, DELTA) == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    # each point of a curve is the composition up to it, and the curve is the same asked again
    curve = epsilon_curve([{**c, "delta": DELTA} for c in cs])
    assert curve == [recompute_epsilon(cs[: i + 1], DELTA) for i in range(len(cs))]
    assert epsilon_curve([{**c, "delta": DELTA} for c in cs]) == curve


@pytest.mark.parametrize("delta", [DELTA, 1e-7])
def test_the_audits_composition_equals_dp_accountings_pld_accountant_to_the_bit(delta):
    """The audit composes a federation's events itself (``_composed_epsilon``), from PLDs the
    run's statement and its other checks share (one subsampled step built once for all its
    self-compositions): exactly what dp-accounting's own ``PLDAccountant`` gives for them."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    from server.privacy.audit_federation import _composed_epsilon

    def accountant_epsilon(steps: tuple) -> float:
        accountant = PLDAccountant(value_discretization_interval=1e-4)
        for (mechanism, sigma, q), n in ((event, n) for event, n in steps if n):  # as before
            gaussian = dpa.GaussianDpEvent(sigma)
            event = gaussian if mechanism == "gaussian" else dpa.PoissonSampledDpEvent(q, gaussian)
            accountant.compose(dpa.SelfComposedDpEvent(event, n))
        return accountant.get_epsilon(delta)

    subsampled = "poisson_subsampled_gaussian"
    node = (((subsampled, 0.9, 0.25), 8), (("gaussian", 10.0, 1.0), 2), ((subsampled, 1.1, 0), 5))
    both = (((subsampled, 0.9, 0.25), 16), ((subsampled, 0.9, 0.5), 4), node[1])  # same step
    for steps in (node, both, (node[0], (("gaussian", 3.0, 1.0), 0))):
        assert _composed_epsilon(steps, delta) == accountant_epsilon(steps), steps
    assert _composed_epsilon((node[0], ((subsampled, 0.0, 0.25), 1)), delta) == math.inf


def test_federation_guarantee_one_node_is_max_all_nodes_composes(honest):
    cs = [{**e, "exclusive_customers": True} for e in honest if e["kind"] == "contribution"]
    regional = federation_guarantee(cs, DELTA, "regional")  # every node vouched
    merchant = federation_guarantee(cs, DELTA, "merchant")
    per_node = regional["per_node"]
    assert regional["epsilon"] == max(per_node.values()) and regional["unvouched"] == []
    assert max(per_node.values()) < merchant["epsilon"] < sum(per_node.values())
    assert merchant["all_nodes"]["basic_composition"]["delta"] == pytest.approx(3 * DELTA)
    # one node's releases say nothing of its customers (a ledger of before nodes vouched):
    # the composition, whatever the operator declared
    cs = [{**c, "exclusive_customers": c["node"] != "1"} for c in cs]
    cs = [{k: v for k, v in c.items() if k != "exclusive_customers" or v} for c in cs]
    unvouched = federation_guarantee(cs, DELTA, "regional")
    assert unvouched["applies"] == "all_nodes" and unvouched["unvouched"] == ["1"]
    assert unvouched["epsilon"] == merchant["epsilon"]
    assert "1 of its 3 nodes (1) did not vouch" in unvouched["why"]


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


def test_audit_reports_state_epsilon_and_delta_rounded_up(tmp_path, honest) -> None:
    """audit.html's federation statements and node table, (the terminal's too) printed a
    spent epsilon of 7.99729 as 7.997 and a delta of 1/3000 as 0.000333: below what was spent."""
    report = audit(copy_run(honest, tmp_path))
    for key in ("one_node", "all_nodes"):
        report["federation"][key].update(epsilon=7.99729, delta=1 / 3000)
    report["nodes"][0].update(reported_epsilon=7.99729, pld_epsilon=7.99729, delta=1 / 3000)
    write_html(report, tmp_path / "audit.html")
    page = (tmp_path / "audit.html").read_text()
    assert "ε = 7.998 at δ = 0.000334" in page and "<td>7.998</td><td>7.998</td>" in page
    assert "7.997" not in page and "0.000333" not in page


def test_audit_printed_to_a_file_cuts_nothing(tmp_path, capsys):
    """Piped or logged (not a terminal), the table kept node names and figures whole and no
    line was wrapped: at 80 columns both nodes printed as ``regional…``, the hash split."""
    nodes = ("regional-north-0", "regional-north-1")
    out = write_run(tmp_path, nodes=nodes, rounds=2)
    assert main(["audit", str(out)]) == 0
    printed = capsys.readouterr().out
    head = json.loads((out / "audit.json").read_text())["head_hash"]
    assert "…" not in printed and all(f" {node} " in printed for node in nodes)
    assert any(line.startswith("PASS hash chain") and head in line for line in printed.splitlines())


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
    assert failed == {"chain", "contribution_index", "rounds"}

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
        config = {"dp": False, "delta": DELTA, "node_dp": True, "dp_rounds": 3}
        config.update(node_target_epsilon=rdp(3), node_delta=DELTA)  # sigma 2 calibrated
        ledger.append("run_start", config=config, unit="u")
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


# --- signed, planned ledgers (issue 13) ------------------------------------------------------

EVAL_SIGMA = 10.0


def write_planned_run(
    out: Path,
    customers: dict[str, int],
    rounds: int = 3,
    target: float = 4.0,
    partition: str = "regional",
    keys: dict[str, NodeKey] | None = None,
    receipts: Path | None = None,
    batch: int = 64,
    dp_epochs: int | None = None,
    cap: int | None = None,
    asked: float | None = None,
    guard_scale: float | None = None,
    vouch: bool | None = None,
) -> Path:
    """An honest run in the new ledger format: each node's sigma calibrated for its plan
    (``dp_epochs``: the config's dp_local_epochs; None: a config from before it, local_epochs 1;
    ``cap``: the config's non-private ``rounds``, the plan then in dp_rounds; training and
    evaluation), a training and an evaluation contribution per round, each
    signed by its node's key when ``keys`` are given (public keys in OUT/node-keys, receipts
    under ``receipts/<node>.jsonl``); ``asked``: the budget the run's start states it asked
    each node to keep (None: none stated, the equal share); ``guard_scale``: the run guards
    its start (``dp-guard``), each node answering one comparison after the last round at that
    scale x sqrt(its customers) (None: a run without the guard, or from before it);
    ``vouch``: what each node states in every release of its customers being its own alone
    (``exclusive_customers``; None: a signed node as the run's partition says, an unsigned
    ledger, one of before nodes vouched, nothing)."""
    ledger = PrivacyLedger(out / "ledger.jsonl")
    config = {
        "target_epsilon": target,
        "delta": 0.0,
        "num_nodes": len(customers),
        "rounds": rounds if cap is None else cap,
        **({"dp_rounds": rounds} if cap is not None else {}),
        "partition": partition,
        "dp": True,
        "dp_batch_size": batch,
        "local_epochs": 1,
        **({"dp_local_epochs": dp_epochs} if dp_epochs else {}),
        "eval_noise_multiplier": EVAL_SIGMA,
        **({"dp_guard": True, "dp_guard_noise_scale": guard_scale} if guard_scale else {}),
    }
    stated = {} if asked is None else {"budget_per_node": asked}
    unit = "one customer's data at one node"
    run_id = ledger.append("run_start", config=config, unit=unit, **stated)["hash"]
    for node, key in (keys or {}).items():
        (out / "node-keys").mkdir(exist_ok=True)
        (out / "node-keys" / f"{node}.pem").write_text(key.public_pem)
    history: dict[str, list[dict]] = {node: [] for node in customers}
    share = node_share(config, asked)  # what the server asks each node to keep
    for r in range(1, rounds + 1):
        for node, n in customers.items():
            q, steps = plan_steps(batch, n, dp_epochs or 1)
            delta = 1 / (10 * n)
            guard_sigma = guard_scale * math.sqrt(n) if guard_scale else None
            releases = ((EVAL_SIGMA, rounds),) + (((guard_sigma, 1),) if guard_sigma else ())
            sigma = calibrate_noise(share, delta, q, steps, rounds, releases)
            purposes = ["training", "evaluation"]
            if guard_sigma and r == rounds:
                purposes.append("guard")
            for purpose in purposes:
                training = purpose == "training"
                fields = {
                    "run_id": run_id,
                    "round": r,
                    "node": node,
                    "purpose": purpose,
                    "contribution_index": len(history[node]),
                    "mechanism": "poisson_subsampled_gaussian" if training else "gaussian",
                    "noise_multiplier": sigma
                    if training
                    else {"evaluation": EVAL_SIGMA, "guard": guard_sigma}[purpose],
                    "sample_rate": q if training else 1.0,
                    "steps": steps if training else 1,
                    "max_grad_norm": 1.0,
                    "delta": delta,
                    "accountant": "prv",
                    "unit": PRIVACY_UNIT,
                    "target_epsilon": share,
                    "num_customers": n,
                    "update_digest": digest_arrays({"w": np.full(3, r, np.float32)})
                    if training
                    else "",
                }
                exclusive = partition == "regional" if vouch is None and keys else vouch
                if exclusive is not None:
                    fields["exclusive_customers"] = exclusive
                history[node].append(fields)
    for cs in history.values():  # each release's epsilon: its node's PLD composition up to it
        for fields, epsilon in zip(cs, epsilon_curve(cs), strict=True):
            fields["epsilon"] = epsilon
    for fields in sorted((f for cs in history.values() for f in cs), key=lambda f: f["round"]):
        node = fields["node"]
        if keys and receipts:
            receipt = append_receipt(receipts / f"{node}.jsonl", fields, keys[node])
            fields.update(signature=receipt["signature"], key_id=receipt["key_id"])
        elif keys:
            fields.update(
                signature=keys[node].sign(signed_payload(fields)), key_id=keys[node].key_id
            )
        else:
            fields.update(signature="", key_id="")
        ledger.append("contribution", **fields)
    ledger.append("run_end", rounds_completed=rounds, reason="done")
    return out


CUSTOMERS = {"0": 800, "1": 1000, "2": 800}


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory) -> dict[str, NodeKey]:
    where = tmp_path_factory.mktemp("keys")
    return {node: NodeKey.load_or_create(where / f"{node}.pem") for node in CUSTOMERS}


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory) -> list[dict]:
    # a merchant run: an unsigned ledger vouches for no node's customers (the regional headline
    # needs the nodes' signed word, tests/server/test_partition_vouch.py)
    out = write_planned_run(tmp_path_factory.mktemp("unsigned"), CUSTOMERS, partition="merchant")
    return read_ledger(out / "ledger.jsonl")


@pytest.fixture(scope="module")
def signed(tmp_path_factory, node_keys) -> Path:
    out = tmp_path_factory.mktemp("signed")
    return write_planned_run(out, CUSTOMERS, keys=node_keys, receipts=out / "receipts")


def rechain(entries: list[dict]) -> list[dict]:
    """What a forger with write access does after editing: re-hash the whole chain."""
    for i, e in enumerate(entries):
        e["prev_hash"] = entries[i - 1]["hash"] if i else "0" * 64
        e["hash"] = entry_hash(e)
    return entries


def forge_sigma(entries: list[dict], node: str) -> list[dict]:
    """``node``'s training noise multiplier doubled and its epsilons lowered to match."""
    entries = [dict(e) for e in entries]
    mine = [e for e in entries if e["kind"] == "contribution" and e["node"] == node]
    for e in mine:
        if e["purpose"] == "training":
            e["noise_multiplier"] *= 2
    for e, epsilon in zip(mine, epsilon_curve(mine), strict=True):
        e["epsilon"] = epsilon
    return rechain(entries)


def write_agreeing_metrics(out: Path) -> None:
    """metrics.json edited to agree with the (forged) ledger in ``out``."""
    cs = [e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"]
    fed = federation_guarantee(cs, None, "regional")
    per_node = {e["node"]: {"epsilon": e["epsilon"], "delta": e["delta"]} for e in cs}
    delta = fed[fed["applies"]]["delta"]  # the statement's own (the one-node delta was below it)
    privacy = {"epsilon": fed["epsilon"], "delta": delta, "per_node": per_node}
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))


def failed_checks(out: Path, *args: str) -> dict[str, list[str]]:
    """The failed checks' problems of ``fedrec audit OUT ARGS``, which must exit 1."""
    assert main(["audit", str(out), *args]) == 1
    checks = json.loads((out / "audit.json").read_text())["checks"]
    return {c["name"]: c["problems"] for c in checks if c["status"] == "fail"}


def test_an_honest_planned_run_passes_every_check(tmp_path, unsigned, signed, capsys):
    out = copy_run(unsigned, tmp_path)
    write_agreeing_metrics(out)
    assert main(["audit", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    names = {c["name"]: c["status"] for c in report["checks"]}
    assert names["calibration"] == names["signatures"] == names["delta"] == "pass"
    assert any("signatures not verified" in n for n in report["notes"])
    printed = capsys.readouterr().out
    assert printed.count("guarantee:") == 1 and f"wrote {out / 'audit.json'}" in printed
    assert "0.00035)-DP" in printed and "0.0003500000" not in printed  # 3 significant digits

    receipts = [f"{node}={signed / 'receipts' / f'{node}.jsonl'}" for node in CUSTOMERS]
    assert main(["audit", str(signed), *(f"--receipts={r}" for r in receipts)]) == 0
    report = json.loads((signed / "audit.json").read_text())
    statuses = {c["name"]: (c["status"], c["message"]) for c in report["checks"]}
    assert statuses["signatures"] == (
        "pass",
        f"18 signature(s) verified against {signed}/node-keys",
    )
    assert statuses["receipts"][0] == "pass" and statuses["receipts"][1].startswith("18 receipt")


def test_forged_sigma_fails_the_calibration_check_unsigned(tmp_path, unsigned):
    out = copy_run(forge_sigma(unsigned, "1"), tmp_path)
    write_agreeing_metrics(out)  # the old checks all agree with the forgery
    failed = failed_checks(out)
    assert list(failed) == ["calibration"]
    lines = [n for n, e in enumerate(unsigned, 1) if e.get("node") == "1"]
    training = [str(n) for n in lines if unsigned[n - 1]["purpose"] == "training"]
    (problem,) = failed["calibration"]
    assert problem.startswith(f"node 1, lines {', '.join(training)} (rounds 1, 2, 3)")
    assert "is inflated" in problem and "PLD calibration gives σ" in problem


def test_forged_sigma_fails_signatures_and_calibration_signed(tmp_path, signed):
    out = copy_run(forge_sigma(read_ledger(signed / "ledger.jsonl"), "1"), tmp_path)
    (out / "node-keys").mkdir()
    for pem in (signed / "node-keys").iterdir():
        (out / "node-keys" / pem.name).write_text(pem.read_text())
    write_agreeing_metrics(out)
    failed = failed_checks(out)
    # and node 1's vouch for its customers, under signatures that no longer verify, is not
    # believed: the headline is the composition, above the target and metrics.json's claim
    assert sorted(failed) == ["calibration", "federation_budget", "metrics", "signatures"]
    assert all(p.startswith("node 1, line ") for p in failed["signatures"])
    assert len(failed["signatures"]) == 6 and "does not verify" in failed["signatures"][0]


def test_an_altered_signed_field_names_node_and_line(tmp_path, signed):
    entries = read_ledger(signed / "ledger.jsonl")
    entries[3]["update_digest"] = "0" * 64  # the server swapped node 1's update
    out = copy_run(rechain(entries), tmp_path)
    failed = failed_checks(out, "--node-keys", str(signed / "node-keys"))
    assert failed.pop("signatures") == [
        f"node {entries[3]['node']}, line 4 (round 1): the signature does not verify: the "
        "entry was altered after the node signed it, or forged"
    ]
    assert list(failed) == ["federation_budget"]  # its vouch no longer believed: composed
    # an entry of another run, and a key that is not the node's
    entries[3] = read_ledger(signed / "ledger.jsonl")[3]
    entries[5]["run_id"] = "f" * 64
    entries[7]["key_id"] = "0" * 16
    out = copy_run(rechain(entries), tmp_path / "other")
    problems = failed_checks(out, "--node-keys", str(signed / "node-keys"))["signatures"]
    assert any("node 2, line 6 (round 1): run_id 'ffff" in p for p in problems)
    assert any("line 8 (round 2): key_id '0000000000000000' is not" in p for p in problems)


def test_an_unsigned_ledger_fails_only_when_node_keys_are_available(tmp_path, honest, signed):
    out = copy_run(honest, tmp_path)
    failed = failed_checks(out, "--node-keys", str(signed / "node-keys"))
    assert list(failed) == ["signatures"] and len(failed["signatures"]) == 9
    assert failed["signatures"][0] == "node 0, line 2 (round 1): unsigned"
    assert main(["audit", str(out)]) == 0
    notes = json.loads((out / "audit.json").read_text())["notes"]
    assert any("signatures not checked: the contributions are unsigned" in n for n in notes)


def test_receipts_that_disagree_with_the_ledger_fail(tmp_path, signed):
    logs = tmp_path / "receipts"
    logs.mkdir()
    for node in ("0", "2"):
        lines = (signed / "receipts" / f"{node}.jsonl").read_text().splitlines()
        if node == "2":
            del lines[4]  # round 3's training receipt: the ledger has an entry the node lacks
            changed = json.loads(lines[1])
            changed["epsilon"] = 0.5
            lines[1] = json.dumps(changed)
            lines.append(json.dumps({**changed, "run_id": "another run"}))  # noted only
        (logs / f"{node}.jsonl").write_text("\n".join(lines) + "\n")
    failed = failed_checks(
        signed, "--receipts", f"0={logs / '0.jsonl'}", "--receipts", f"2={logs / '2.jsonl'}"
    )
    epsilon = next(
        e["epsilon"]
        for e in read_ledger(signed / "ledger.jsonl")
        if e.get("node") == "2" and e.get("contribution_index") == 1
    )
    assert failed == {
        "receipts": [
            f"node 2, round 1 (line 7): epsilon: the receipt has 0.5, the ledger {epsilon!r}",
            f"node 2, round 3 (line 18): not among the node's receipts ({logs / '2.jsonl'})",
        ]
    }
    notes = json.loads((signed / "audit.json").read_text())["notes"]
    assert any("node 2: its receipt log also holds 1 release(s) of 1 other" in n for n in notes)


def test_refused_entries_are_listed_and_do_not_fail(tmp_path, honest):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError, match="needs reason"):
        ledger.append("refused", round=1, node="0")
    for e in honest[:-1]:
        ledger.append(e["kind"], **{k: v for k, v in e.items() if k not in RESERVED})
    ledger.append("refused", round=4, node="1", reason="target_epsilon 20 > the node's 8")
    ledger.append("refused", round=4, node="9", reason="delta 1e-3 > the node's 1e-5")
    ledger.append("run_end", rounds_completed=3, reason="no node could train")
    assert main(["audit", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert [(d["node"], d["round"]) for d in report["refused"]] == [("1", 4), ("9", 4)]
    assert {n["node"]: n["status"] for n in report["nodes"]}["9"] == "refused only"
    budget = next(c for c in report["checks"] if c["name"] == "budget")
    assert budget["message"] == "every node within budget; 2 contribution(s) refused"
    assert "refused: node 1, round 4" in (tmp_path / "audit.html").read_text()


def test_delta_at_or_above_one_over_customers_fails(tmp_path):
    def run(out: Path, delta: float) -> Path:
        ledger = PrivacyLedger(out / "ledger.jsonl")
        ledger.append(
            "run_start", config={"dp": True, "delta": 0.0, "target_epsilon": 8.0}, unit="u"
        )
        c = {
            "mechanism": "poisson_subsampled_gaussian",
            "noise_multiplier": SIGMA,
            "sample_rate": RATE,
            "steps": STEPS,
        }
        ledger.append(
            "contribution",
            round=1,
            node="0",
            contribution_index=0,
            max_grad_norm=1.0,
            delta=delta,
            epsilon=recompute_epsilon([c], delta),
            accountant="prv",
            unit=PRIVACY_UNIT,
            target_epsilon=8.0,
            num_customers=500,
            **c,
        )
        return out

    assert main(["audit", str(run(tmp_path / "own", 1e-4))]) == 0  # each node its own delta
    failed = failed_checks(run(tmp_path / "weak", 0.002))
    assert failed == {
        "delta": [
            "node 0, line 2: delta 0.002 >= 1 / 500 customers: the mechanism may reveal a "
            "customer outright (take delta well below 1 / customers)"
        ]
    }


def test_one_thousand_canaries_cannot_confirm_epsilon_8():
    assert max_reachable(1000, 0.95, 1e-8) < 8
    needed = canaries_needed(8.0, 0.95, 1e-8)
    assert max_reachable(needed, 0.95, 1e-8) >= 8 > max_reachable(needed - 1, 0.95, 1e-8)
    assert canaries_needed(8.0, 0.95, 1e-5) is None  # the 2 m delta term caps the bound near 5
    assert canaries_needed(2.0, 0.95, 1e-5) == 40


def test_the_empirical_audit_is_inconclusive_not_passed(tmp_path):
    out = write_planned_run(tmp_path, {"0": 10_000_000}, rounds=2, target=8.0, batch=100_000)
    scores, included = randomized_response(0, epsilon=0.5, m=1000)
    write_canaries(out / "canaries.json", scores.tolist(), included.tolist(), "minus the loss")
    assert main(["audit", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    emp = report["empirical"]
    assert 7.9 < emp["formal_epsilon"] <= 8 and emp["delta"] == pytest.approx(1e-8)
    assert emp["status"] == "inconclusive" and emp["max_reachable"] < emp["formal_epsilon"]
    assert emp["canaries_needed"] == 20_000  # the (k+, k-) grid adds k = 10,000 there
    (check,) = [c for c in report["checks"] if c["name"] == "empirical"]
    assert check["status"] == "inconclusive" and check["passed"] is None
    assert f"needs {emp['canaries_needed']:,} canaries" in check["message"]
    page = (out / "audit.html").read_text()
    assert "inconclusive" in page and "Inconclusive: not a confirmation" in page


def test_a_merchant_metrics_json_stating_the_worst_node_fails(tmp_path):
    out = write_planned_run(tmp_path, CUSTOMERS, partition="merchant")
    cs = [e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"]
    worst = max(e["epsilon"] for e in cs)
    per_node = {e["node"]: e["epsilon"] for e in cs}
    privacy = {"epsilon": worst, "delta": max(e["delta"] for e in cs), "per_node": per_node}
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    (problem,) = failed_checks(out)["metrics"]  # each node kept its share: budgets hold
    fed = federation_guarantee(cs, None, "merchant")
    assert fed["all_nodes"]["delta"] == pytest.approx(1 / 8000 + 1 / 10000 + 1 / 8000)
    assert fed["epsilon"] > worst * 1.2
    # at the largest node's delta, not their sum, where the recomputed epsilon is larger still
    assert problem.startswith("metrics.json states delta 0.000125, below the guarantee's")
    assert "; at a smaller delta the epsilon is larger" in problem
    assert "which applies: the run declares a merchant partition" in problem
    privacy["epsilon"] = fed["epsilon"]  # at the largest node's delta: below the guarantee's
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    assert "below the guarantee's" in failed_checks(out)["metrics"][0]
    privacy["delta"] = fed["all_nodes"]["delta"]
    (out / "metrics.json").write_text(json.dumps({"privacy": privacy}))
    assert main(["audit", str(out)]) == 0


def test_epsilon_plot_keeps_the_budget_label_inside_the_axes(unsigned, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = epsilon_figure(audit(copy_run(unsigned, tmp_path)))
    renderer = FigureCanvasAgg(fig).get_renderer()
    (ax,) = fig.axes
    (label,) = ax.texts
    box, axes_box = label.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert label.get_text() == f"budget ε = {4 / len(CUSTOMERS):g}"  # a merchant run's share
    assert axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1  # inside the axes
    assert not box.overlaps(ax.title.get_window_extent(renderer))


def test_an_older_ledger_is_calibrated_for_training_alone(tmp_path):
    """No ``purpose`` field: written before evaluation releases were charged, so the plan its
    nodes calibrated for is training only, whatever the config says about evaluation."""
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    config = {"dp": True, "delta": 1e-4, "target_epsilon": 4.0, "rounds": 2, "partition": "x"}
    config.update(dp_batch_size=64, local_epochs=1, eval_noise_multiplier=EVAL_SIGMA)
    ledger.append("run_start", config=config, unit="u")
    q, steps = plan_steps(64, 800, 1)
    c = {
        "mechanism": "poisson_subsampled_gaussian",
        "noise_multiplier": calibrate_noise(4.0, 1e-4, q, steps, 2, ()),
        "sample_rate": q,
        "steps": steps,
    }
    for r in (1, 2):
        ledger.append(
            "contribution",
            round=r,
            node="0",
            contribution_index=r - 1,
            max_grad_norm=1.0,
            delta=1e-4,
            epsilon=recompute_epsilon([c] * r, 1e-4),
            accountant="prv",
            unit=PRIVACY_UNIT,
            target_epsilon=4.0,
            num_customers=800,
            **c,
        )
    assert main(["audit", str(tmp_path)]) == 0
    checks = json.loads((tmp_path / "audit.json").read_text())["checks"]
    assert next(c for c in checks if c["name"] == "calibration")["status"] == "pass"


def forge(tmp_path: Path, name: str, entries: list[dict], **config) -> dict:
    """The audit report of ``entries`` with their run_start config changed by ``config``."""
    entries = [dict(e) for e in entries]
    entries[0] = {**entries[0], "config": {**entries[0]["config"], **config}}
    forged = tmp_path / name
    forged.mkdir()
    PrivacyLedger(forged / "ledger.jsonl")  # creates the file with its permissions
    (forged / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in rechain(entries)))
    assert main(["audit", str(forged)]) != 0
    return json.loads((forged / "audit.json").read_text())


def test_the_plan_counts_dp_rounds_and_dp_local_epochs(tmp_path, node_keys):
    """A private run's plan is ``dp_rounds`` rounds of ``dp_local_epochs`` epochs (``rounds``
    and ``local_epochs`` are the non-private run's): 2 rounds of 3 epochs under a config whose
    rounds is 10 pass; the same contributions under a config claiming 1 epoch fail the steps
    check, and one claiming 4 rounds, a plan whose noise the nodes did not add, fail the
    calibration check."""
    out = write_planned_run(
        tmp_path / "planned", CUSTOMERS, rounds=2, dp_epochs=3, cap=10, keys=node_keys
    )
    assert main(["audit", str(out)]) == 0
    entries = read_ledger(out / "ledger.jsonl")
    report = forge(tmp_path, "one-epoch", entries, dp_local_epochs=1)
    failed = json.dumps([c for c in report["checks"] if c["passed"] is False])
    assert "x dp_local_epochs" in failed
    report = forge(tmp_path, "four-rounds", entries, dp_rounds=4)
    calibration = next(c for c in report["checks"] if c["name"] == "calibration")
    assert calibration["status"] == "fail" and "4 rounds" in json.dumps(calibration)


@pytest.mark.parametrize("target", [0.2, 2.0])
def test_a_node_calibrated_at_a_small_budget_passes_the_calibration_check(target):
    """A node calibrates with Opacus's PRV accountant, whose epsilon carries an error of 0.01
    by default: at a merchant's budget of 0.2 (2 shared by ten) that alone inflated its sigma
    4.4% past the audit's PLD calibration, and the audit failed an honest node. The node's
    sigma must sit inside the margin the audit allows, neither too small nor inflated."""
    from server.privacy.accounting import plan_epsilon
    from server.privacy.audit_calibration import INFLATION_MARGIN
    from shared.recommender.training import calibrate_noise as node_calibration

    delta, rounds = 1.2e-4, 6
    q, steps = plan_steps(512, 2236, 3)
    sigma = node_calibration(target, delta, q, steps * rounds)
    spent = plan_epsilon(sigma, q, steps, rounds, (), delta)
    inflated = plan_epsilon(sigma * (1 - INFLATION_MARGIN), q, steps, rounds, (), delta)
    assert spent <= target * (1 + 0.01)
    assert inflated > target
    audited = calibrate_noise(target, delta, q, steps, rounds, ())
    assert abs(sigma / audited - 1) < INFLATION_MARGIN / 2


def test_a_merchant_run_is_audited_against_the_budget_it_asked_and_the_composition(tmp_path):
    """A merchant run asks each node for the largest budget whose plans composed stay within
    the target (server/federation/budget.py), states it in its start, and is audited against
    it; a start that asks more than composition allows passes each node's check and fails the
    federation's."""
    rounds, target, batch = 3, 4.0, 64
    plans = []
    for n in CUSTOMERS.values():
        q, steps = plan_steps(batch, n, 1)
        plans.append(NodePlan(q, steps, rounds, ((EVAL_SIGMA, rounds),), None, 1 / (10 * n)))
    asked = split_budget(target, plans, None)
    assert asked > 1.5 * target / len(CUSTOMERS)  # well above the equal share
    out = write_planned_run(
        tmp_path / "fair", CUSTOMERS, rounds, target, "merchant", batch=batch, asked=asked
    )
    assert main(["audit", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["budget_per_node"] == asked
    assert target * 0.95 < report["federation"]["all_nodes"]["epsilon"] <= target
    greedy = write_planned_run(
        tmp_path / "greedy", CUSTOMERS, rounds, target, "merchant", batch=batch, asked=target
    )
    assert main(["audit", str(greedy)]) == 1
    checks = json.loads((greedy / "audit.json").read_text())["checks"]
    status = {c["name"]: c["status"] for c in checks}
    assert status["budget"] == "pass" and status["federation_budget"] == "fail"


def test_the_start_guard_is_audited_as_part_of_each_node_plan(tmp_path, node_keys):
    """A guarded run's nodes calibrate for the guard's comparison too: audited against its
    run_start (dp_guard, dp_guard_noise_scale: each node's noise the scale x sqrt(its
    customers)), it passes; the same ledger under a start without the guard fails the
    calibration (the guard releases belong to no plan), and under one stating another guard
    noise fails it too (the releases are not at the plan's noise), as under the first guard's
    key (dp_guard_noise: one std for every node), which the audit reads for older ledgers."""
    out = write_planned_run(
        tmp_path / "guarded", CUSTOMERS, rounds=2, guard_scale=0.4, keys=node_keys
    )
    entries = read_ledger(out / "ledger.jsonl")
    assert [e["purpose"] for e in entries if e.get("node") == "0"][-1] == "guard"
    assert main(["audit", str(out)]) == 0
    for name, config, words in (
        ("unguarded", {"dp_guard": False}, "guard release, but the run's plan holds none"),
        ("noisier", {"dp_guard_noise_scale": 0.8}, "guard release with noise_multiplier"),
        (
            "fixed",
            {"dp_guard_noise_scale": None, "dp_guard_noise": 20.0},
            "guard release with noise_multiplier",
        ),
    ):
        report = forge(tmp_path, name, entries, **config)
        calibration = next(c for c in report["checks"] if c["name"] == "calibration")
        assert calibration["status"] == "fail" and words in json.dumps(calibration)


@pytest.mark.parametrize(
    "field, value, rounds",
    [
        ("steps", 10**9, 1),
        ("steps", 10**30, 1),
        ("noise_multiplier", 10**30, 1),
        ("steps", 300_000, 6),
        ("round", None, 1),  # the rounds check compared it
        ("target_epsilon", None, 1),  # the budget check compared it
    ],
)
def test_a_tampered_release_cannot_exhaust_the_auditors_accountant(tmp_path, field, value, rounds):
    """Found fuzzing the audit: one contribution stating 10^9 steps asked the PLD accountant
    for 111 GiB, 10^30 overflowed it, and 10^6 took 76 s and 3.6 GB. An entry beyond what any
    plan states fails ``recomputed`` instead; so does a node whose entries, each within
    bounds, state more steps together than any plan (300,000 x its 12 entries here)."""
    out = write_planned_run(tmp_path / "run", CUSTOMERS, rounds=rounds)
    entries = read_ledger(out / "ledger.jsonl")
    mine = [e for e in entries if e["kind"] == "contribution" and e["node"] == "1"]
    for e in mine if rounds > 1 else mine[:1]:
        e[field] = value
    started = time.monotonic()
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert time.monotonic() - started < 60
    failing = {c["name"]: c["problems"] for c in report["checks"] if c["status"] == "fail"}
    assert any(p.startswith("node 1") for p in failing["recomputed"])


@pytest.mark.parametrize("where", ["rounds_completed", "config rounds"])
def test_a_tampered_round_count_cannot_exhaust_the_audit(tmp_path, where):
    """Found fuzzing the audit: run_end's rounds_completed of 10^30 made the rounds check list
    every round up to it, and a run_start config of 10^9 rounds made the calibration check
    compose them; the machine ran out of memory both times."""
    entries = read_ledger(write_planned_run(tmp_path / "run", CUSTOMERS, rounds=1) / "ledger.jsonl")
    if where == "rounds_completed":
        entries[-1]["rounds_completed"] = 10**30
    else:
        entries[0]["config"]["rounds"] = 10**9
    started = time.monotonic()
    report = audit(copy_run(rechain(entries), tmp_path / "tampered"))
    assert time.monotonic() - started < 60
    failing = {c["name"]: c["problems"] for c in report["checks"] if c["status"] == "fail"}
    if where == "rounds_completed":
        assert "is not a round count" in failing["fields"][0]
    else:
        assert all("more than the audit recomputes" in p for p in failing["calibration"])
