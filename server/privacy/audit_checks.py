"""The audit's check families on a read ledger: each adds its checks (and table rows, notes)
to the report dict that ``server.privacy.audit.audit`` builds. Signatures and receipts are in
``server.privacy.audit_signatures``; presentation in ``server.privacy.audit_report``."""

from __future__ import annotations

import math
import reprlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.privacy import accounting
from server.privacy.canary_audit import canaries_needed, epsilon_lower_bound, read_canaries
from server.privacy.ledger import is_number
from shared.federation.reports import release_value_problem
from shared.runs.config import MAX_NOISE_MULTIPLIER, MAX_TARGET_EPSILON, MIN_NOISE_MULTIPLIER


def check(name: str, title: str, problems: list[str], ok: str, status: str | None = None) -> dict:
    """One check of the report. ``status``: "pass", "fail", "warn" (``problems`` are warnings:
    the figures hold but say less than they seem to; it does not fail the audit) or
    "inconclusive" (neither: it does not fail the audit, and ``passed`` is None); by default
    "fail" exactly when there are problems."""
    status = status or ("fail" if problems else "pass")
    counted = {"fail": f"{len(problems)} problem(s)", "warn": f"{len(problems)} warning(s)"}
    return {
        "name": name,
        "title": title,
        "status": status,
        "passed": None if status == "inconclusive" else status in ("pass", "warn"),
        "message": counted.get(status, ok),
        "problems": problems,
    }


# what one release of any run spends at most by the RDP bound (accounting.RDP_SPARE)
MAX_RELEASE_RDP_EPSILON = accounting.RDP_SPARE * MAX_TARGET_EPSILON + 1
# far above any run's rounds: a round or count beyond it is tampered, and no check loops to it
MAX_ROUNDS = 100_000


def is_round(x: Any) -> bool:
    """Whether ``x`` is a round number (or count of rounds) a run could reach."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_ROUNDS


def node_order(node: str) -> tuple:
    """Sort key of node names: numbered nodes first, by number, then the others by name."""
    return (not node.isdigit(), int(node) if node.isdigit() else 0, node)


def by_node(entries: list[dict]) -> dict[str, list[dict]]:
    """Entries grouped by node, nodes in natural order, entries in ledger order."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        grouped[str(e["node"])].append(e)
    return {node: grouped[node] for node in sorted(grouped, key=node_order)}


def entry_problem(e: dict) -> str | None:
    """Why a contribution or node_level entry cannot be recomputed (None: it can)."""
    try:
        accounting.contribution_event(e)
    except ValueError as error:
        return f"cannot recompute: {error}"
    if e["steps"] > accounting.MAX_ENTRY_STEPS:  # a tampered entry must not exhaust the audit
        return f"{e['steps']} steps, more than any plan ({accounting.MAX_ENTRY_STEPS:,})"
    if not MIN_NOISE_MULTIPLIER <= e["noise_multiplier"] <= MAX_NOISE_MULTIPLIER:
        bounds = f"[{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]"
        return f"noise_multiplier {e['noise_multiplier']:g} outside {bounds}"
    if not (is_number(e["delta"]) and 0 < e["delta"] < 1):
        return f"delta must be in (0, 1), got {e['delta']!r}"
    params = (e["mechanism"], e["noise_multiplier"], e["sample_rate"], e["steps"], e["delta"])
    spent, most = accounting.release_rdp_epsilon(*params), MAX_RELEASE_RDP_EPSILON
    if not spent <= most:  # PLD's memory grows with the loss: 38 GiB at noise 0.001
        return f"spends epsilon {spent:.4g} by the RDP bound, above the {most:g} no run reaches"
    if not is_number(e["epsilon"]):
        return f"epsilon must be a finite number, got {e['epsilon']!r}"
    if not is_round(e["round"]):
        return f"round {reprlib.repr(e['round'])} is not a round number (0 to {MAX_ROUNDS:,})"
    if "target_epsilon" in e and not is_number(e["target_epsilon"]):
        return f"target_epsilon must be a finite number, got {e['target_epsilon']!r}"
    return None


def audit_releases(report: dict, contributions: list[dict], lines: dict[int, int]) -> None:
    """The ``releases`` check: every contribution states what an accountant recomputes
    honestly (:func:`shared.federation.reports.release_value_problem`)."""
    problems = [
        f"node {c['node']}, line {lines[id(c)]} (round {reprlib.repr(c['round'])}): {p}"
        for c in contributions
        if (p := release_value_problem(c))
    ]
    report["checks"].append(
        check(
            "releases",
            "every release is customer-level, of a known accountant, with parameters it recomputes",
            problems,
            f"{len(contributions)} customer-level releases",
        )
    )


def _index_gaps(node: str, cs: list[dict], lines: dict[int, int]) -> list[str]:
    gaps = []
    for prev, c in zip([None, *cs], cs, strict=False):
        if not all(isinstance(x["contribution_index"], int) for x in (prev or c, c)):
            gaps.append(f"node {node}: line {lines[id(c)]}: contribution_index is not an integer")
            continue
        if prev is None:
            if c["contribution_index"] > 0:
                gaps.append(_first_index_problem(node, c, lines))
            continue
        want = prev["contribution_index"] + 1
        if c["contribution_index"] != want:
            gaps.append(
                f"node {node}: contribution_index {c['contribution_index']} at line "
                f"{lines[id(c)]}, expected {want}: "
                + (
                    "a contribution is missing"
                    if c["contribution_index"] > want
                    else "a contribution is repeated or out of order"
                )
            )
    return gaps


def _first_index_problem(node: str, c: dict, lines: dict[int, int]) -> str:
    """A node whose first contribution here is not its contribution 0: the ledger has no way
    to declare spending before it (run_start carries none), so the earlier ones are missing."""
    first = c["contribution_index"]
    return (
        f"node {node}: its first contribution here (line {lines[id(c)]}) is contribution_index "
        f"{first}: its contributions 0 to {first - 1} are not in this ledger, and nothing in a "
        "ledger declares earlier spending (the federation statement accounts them at the "
        "node's costliest release); if they belong to an earlier federation on the node's "
        f"data, check them in its receipt log (--receipts {node}=PATH)"
    )


def audit_contributions(
    report: dict, contributions: list[dict], config: dict, lines: dict[int, int], tolerance: float
) -> None:
    """Checks: contribution indices, reported >= recomputed epsilon, each node's budget; the
    node table."""
    target = config.get("target_epsilon")
    nodes = by_node(contributions)
    gaps, below, over, notes = [], [], [], report["notes"]
    for node, cs in nodes.items():
        gaps.extend(_index_gaps(node, cs, lines))
        bad = [f"node {node}, line {lines[id(c)]}: {p}" for c in cs if (p := entry_problem(c))]
        if not bad and sum(c["steps"] for c in cs) > accounting.MAX_NODE_STEPS:
            bad = [  # a tampered ledger must not keep the auditor's accountant busy for hours
                f"node {node}: its entries state more than {accounting.MAX_NODE_STEPS:,} "
                "steps together, more than any plan; not recomputed"
            ]
        if bad:
            below.extend(bad)
            report["nodes"].append({"node": node, "contributions": len(cs), "status": "bad entry"})
            continue
        curve = accounting.epsilon_curve(cs)
        points = []
        for c, recomputed in zip(cs, curve, strict=True):
            rel = (c["epsilon"] - recomputed) / recomputed if recomputed > 0 else 0.0
            points.append(
                {
                    "line": lines[id(c)],
                    "round": c["round"],
                    "purpose": c.get("purpose", "training"),
                    "reported": c["epsilon"],
                    "recomputed": recomputed,
                    "rel_diff": rel,
                }
            )
            if c["epsilon"] < recomputed * (1 - tolerance):
                below.append(
                    f"node {node}, round {c['round']} (line {lines[id(c)]}): reported "
                    f"epsilon {c['epsilon']:.4f} is below the PLD recomputation "
                    f"{recomputed:.4f} ({rel:+.1%}, tolerance {tolerance:.1%})"
                )
        last = cs[-1]
        asked = report.get("budget_per_node")
        budget = node_share(config, asked) if is_number(target) else last["target_epsilon"]
        if not math.isclose(last["target_epsilon"], budget, rel_tol=1e-9):
            notes.append(
                f"node {node}: contributions state target_epsilon "
                f"{last['target_epsilon']} but the run was configured with {budget}"
            )
        final = max(last["epsilon"], curve[-1])
        if not is_number(budget):
            over.append(f"node {node}: no numeric target_epsilon to check against")
        elif final > budget:
            over.append(f"node {node}: final epsilon {final:.4f} exceeds its budget {budget:g}")
        status = [
            s
            for s, failed in (
                ("index gap", any(g.startswith(f"node {node}:") for g in gaps)),
                ("ε too low", any(b.startswith(f"node {node},") for b in below)),
                ("over budget", any(o.startswith(f"node {node}:") for o in over)),
            )
            if failed
        ]
        report["nodes"].append(
            {
                "node": node,
                "contributions": len(cs),
                "rounds": [c["round"] for c in cs],
                "reported_epsilon": last["epsilon"],
                "pld_epsilon": curve[-1],
                "rdp_epsilon": accounting.rdp_epsilon(cs, last["delta"]),
                "rel_diff": min(p["rel_diff"] for p in points),
                "delta": last["delta"],
                "target_epsilon": budget,
                "declined_rounds": _rounds_of(report["declined"], node),
                "refused_rounds": _rounds_of(report["refused"], node),
                "status": ", ".join(status) or "ok",
                "curve": points,
            }
        )
    for kind in ("declined", "refused"):
        for node in sorted({d["node"] for d in report[kind]} - set(nodes), key=node_order):
            report["nodes"].append(
                {
                    "node": node,
                    "contributions": 0,
                    "rounds": [],
                    f"{kind}_rounds": _rounds_of(report[kind], node),
                    "status": f"{kind} only",
                }
            )
    checks = report["checks"]
    checks.append(
        check(
            "contribution_index",
            "no gaps in contribution_index per node",
            gaps,
            f"{len(contributions)} contributions from {len(nodes)} nodes, indices contiguous",
        )
    )
    checks.append(
        check(
            "recomputed",
            "reported epsilon >= PLD recomputation x (1 - tolerance)",
            below,
            "every reported epsilon holds against dp-accounting PLD",
        )
    )
    held = [
        f"{len(report[kind])} contribution(s) {kind}"
        for kind in ("declined", "refused")
        if report[kind]
    ]
    checks.append(
        check(
            "budget",
            "every node within its target epsilon",
            over,
            "every node within budget" + (f"; {', '.join(held)}" if held else ""),
        )
    )


def node_share(config: dict, asked: float | None = None) -> float:
    """The budget each node was asked to keep: the run's target when a customer is at one node
    only (regional); else what the run's start states it asked (``asked``: the largest equal
    budget whose composition over the nodes' plans stays within the target,
    server/federation/budget.py; the federation check below composes what they spent), and
    for a ledger that states none an equal share of the target over the nodes."""
    target = float(config["target_epsilon"])
    if config.get("partition", "regional") == "regional":
        return target
    if is_number(asked) and 0 < asked <= target:
        return float(asked)
    return target / max(int(config.get("num_nodes") or config.get("clients") or 1), 1)


def _rounds_of(events: list[dict], node: str) -> list[int]:
    return [d["round"] for d in events if d["node"] == node]


def audit_delta(
    report: dict, contributions: list[dict], config: dict, lines: dict[int, int]
) -> None:
    """Each contribution's delta is below 1 / its node's customers, and not above the
    configured delta unless that is 0 (each node its own)."""
    config_delta = config.get("delta")
    fixed = is_number(config_delta) and config_delta > 0  # else each node chose its own
    problems = []
    if not is_number(config_delta):
        problems.append("run_start config has no numeric delta to check against")
    for c in contributions:
        where = f"node {c['node']}, line {lines[id(c)]}"
        customers, delta = c["num_customers"], c["delta"]
        if not (is_number(customers) and customers > 0):
            problems.append(f"{where}: num_customers {customers!r} is not a positive number")
        elif is_number(delta) and delta * customers >= 1:
            problems.append(
                f"{where}: delta {delta:.3g} >= 1 / {customers:g} customers: the mechanism "
                "may reveal a customer outright (take delta well below 1 / customers)"
            )
        if fixed and is_number(delta) and delta > config_delta:
            problems.append(f"{where}: delta {delta:.3g} exceeds the configured {config_delta:.3g}")
    configured = f" and <= the configured {config_delta:.3g}" if fixed else " (each node its own)"
    report["checks"].append(
        check(
            "delta",
            "delta < 1 / customers, and <= the configured delta unless that is 0",
            problems,
            f"every contribution's delta < 1 / its node's customers{configured}",
        )
    )


def _formal(report: dict, node: str) -> tuple[float | None, float, str | None]:
    """(formal epsilon, its delta, what it is) the canaries are compared with: the named
    node's, else the federation guarantee that applies."""
    row = next((n for n in report["nodes"] if n["node"] == node and "pld_epsilon" in n), None)
    if row:
        return max(row["reported_epsilon"], row["pld_epsilon"]), row["delta"], f"node {node}'s ε"
    fed = report["federation"]
    if fed:
        return fed["epsilon"], fed[fed["applies"]]["delta"], "the federation guarantee"
    delta = report["config"].get("delta")
    return None, float(delta) if is_number(delta) and 0 < delta < 1 else 0.0, None


def audit_canaries(report: dict, path: Path) -> None:
    """The one-run empirical lower bound: above the formal epsilon fails; when even perfect
    guesses on this many canaries could not reach the formal epsilon, it is inconclusive."""
    try:
        data = read_canaries(path)
        formal, delta, against = _formal(report, str(data.get("node", "")))
        bound = epsilon_lower_bound(data["scores"], data["included"], delta=delta)
    except ValueError as error:
        report["checks"].append(check("empirical", "empirical lower bound", [str(error)], ""))
        return
    bound.update(score=data["score"], formal_epsilon=formal, compared_with=against)
    report["empirical"] = bound
    lower, reach, m = bound["epsilon_lower_bound"], bound["max_reachable"], bound["num_canaries"]
    if formal is None:
        bound["status"] = "no formal guarantee"
        report["notes"].append(
            f"empirical lower bound {lower:.3f} (at most {reach:.3f} reachable with {m} "
            "canaries; no formal guarantee to compare with)"
        )
        return
    title = "empirical lower bound <= formal epsilon"
    if lower > formal:
        bound["status"] = "fail"
        problem = (
            f"the empirical lower bound {lower:.3f} exceeds {against} {formal:.3f}: the training "
            f"leaks more than its accounting claims (or a {1 - bound['confidence']:.0%} "
            "false alarm)"
        )
        report["checks"].append(check("empirical", title, [problem], ""))
        return
    ok = (
        f"lower bound {lower:.3f} <= {against} {formal:.3f} ({bound['confidence']:.0%} "
        f"confidence, {m} canaries)"
    )
    if reach >= formal:
        bound["status"] = "pass"
        report["checks"].append(
            check("empirical", title, [], f"{ok}; a bound up to {reach:.3f} was reachable")
        )
        return
    bound["status"] = "inconclusive"
    bound["canaries_needed"] = canaries_needed(formal, bound["confidence"], delta)
    need = (
        f"a conclusive check needs {bound['canaries_needed']:,} canaries"
        if bound["canaries_needed"]
        else f"no canary count reaches it at δ = {delta:.3g} (the 2mδ term caps the bound)"
    )
    report["checks"].append(
        check(
            "empirical",
            title,
            [],
            f"inconclusive: even perfect guesses on {m} canaries give at most ε ≥ {reach:.3f}, "
            f"below {against} {formal:.3f}, so this bound could not have shown a violation; "
            f"{need}",
            status="inconclusive",
        )
    )


def _uncovered_rounds(node: str, entries: list[dict], completed: int) -> list[int]:
    """The rounds from ``node``'s first training contribution to ``completed`` with no entry
    of it (training contribution, refusal, decline, unanswered request), less those a
    recovered contribution recorded in the same or a later round accounts for
    (server/privacy/ledger_gaps.py)."""
    mine = [e for e in entries if str(e.get("node")) == node]
    training = [  # a round that is not a round number fails the recomputed check
        e
        for e in mine
        if e["kind"] == "contribution"
        and e.get("purpose", "training") == "training"
        and is_round(e["round"])
    ]
    if not training:
        return []
    covered = {e["round"] for e in training if not e.get("recovered")}
    covered |= {  # an unanswered request is counted as spent (server/privacy/ledger_gaps.py)
        e["round"]
        for e in mine
        if e["kind"] in ("refused", "declined", "unanswered")
        and e.get("stage", "train") == "train"
        and is_round(e["round"])  # a tampered round fails the fields check
    }
    recovered = sorted(
        e["round"]
        for e in mine
        if e["kind"] == "contribution" and e.get("recovered") and is_round(e["round"])
    )
    first = min(e["round"] for e in training)
    missing = []
    for r in range(first, completed + 1):
        if r in covered:
            continue
        later = next((x for x in recovered if x >= r), None)
        if later is None:
            missing.append(r)
        else:
            recovered.remove(later)
    return missing


def audit_rounds(report: dict, entries: list[dict], config: dict) -> None:
    """Against ``run_end``'s rounds_completed: under DP some node contributed, and each node
    that contributed has an entry (training contribution, refusal or decline) in every
    completed round from its first on, when every node is asked each round."""
    ends = [e for e in entries if e["kind"] == "run_end"]
    completed = ends[-1]["rounds_completed"] if ends else None
    if not isinstance(completed, int) or isinstance(completed, bool):
        return
    problems = []
    contributions = [e for e in entries if e["kind"] == "contribution"]
    if report["dp"] is not False and completed > 0 and not contributions:
        problems.append(
            f"run_end counts {completed} completed round(s) under DP, but the ledger holds no "
            "contribution: every completed round had a node's release"
        )
    fraction = config.get("fraction_train", 1.0)
    if is_number(fraction) and fraction < 1:
        report["notes"].append(
            f"fraction_train {fraction:g}: nodes are sampled, so a round without a node's "
            "entry is not checked"
        )
    else:
        for node in by_node(contributions):
            missing = _uncovered_rounds(node, entries, completed)
            if missing:
                problems.append(
                    f"node {node}: round(s) {', '.join(map(str, missing))} of the {completed} "
                    "run_end counts as completed have no entry of it (no training "
                    "contribution, refusal or decline), though it contributed before: its "
                    "release there is missing from the ledger"
                )
    report["checks"].append(
        check(
            "rounds",
            "every completed round has each contributing node's entry",
            problems,
            f"every node's entries cover the {completed} completed round(s)",
        )
    )
