"""The audit of node-level DP (``node-dp``): the server's Gaussian noise on the sum of clipped
node updates, one ``node_level`` ledger entry per round (server/privacy/node_privacy.py).

Each entry must be the mechanism the server runs (``gaussian``, no amplification by sampling:
Flower samples a fixed number of nodes), at the configured ``node_delta``, with the noise
multiplier the audit's own calibration gives for the planned rounds at
``node_target_epsilon`` (dp-accounting RDP, the accountant the server calibrates with), and
reported epsilons at least the PLD recomputation. Under ``node_dp`` every round ``run_end``
counts as completed has its entry."""

from __future__ import annotations

import math

from server.privacy import accounting
from server.privacy.audit_checks import check, entry_problem, is_number, is_round
from shared.runs.rounding import up, up_significant

# the server calibrates to 0.1% with the same RDP accountant: 1% allows for that and nothing more
NODE_SIGMA_TOLERANCE = 0.01
NODE_KEYS = ("node_target_epsilon", "node_delta")


def calibrate_node_sigma(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` Gaussian releases spend at most
    ``target_epsilon`` at ``delta`` by dp-accounting's RDP accountant, without amplification."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    def fits(sigma: float) -> bool:
        accountant = RdpAccountant()
        accountant.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), rounds))
        return accountant.get_epsilon(delta) <= target_epsilon

    low, high = 1e-2, 1e4
    if fits(low):
        return low
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _plan_problems(entries: list[dict], config: dict, lines: dict[int, int]) -> list[str]:
    """Each entry's mechanism, delta and noise multiplier against the run's node-level plan."""
    rounds = config.get("dp_rounds", config.get("rounds"))
    lacking = [k for k in NODE_KEYS if not is_number(config.get(k))]
    lacking += [] if isinstance(rounds, int) and rounds >= 1 else ["dp_rounds"]
    if lacking:
        return [
            f"run_start config lacks usable {', '.join(lacking)}: the node-level noise and "
            "delta cannot be checked"
        ]
    target, delta = float(config["node_target_epsilon"]), float(config["node_delta"])
    sigma = calibrate_node_sigma(target, delta, rounds)
    problems = []
    nodes = config.get("num_nodes", config.get("clients"))
    if is_number(nodes) and nodes >= 1 and delta >= 1 / nodes:
        problems.append(
            f"the configured node_delta {delta:g} is not below 1/{nodes:g} nodes: at it, "
            "publishing one node's update outright meets the node-level guarantee"
        )
    for e in entries:
        where = f"round {e['round']} (line {lines[id(e)]})"
        if e["mechanism"] != "gaussian":
            problems.append(
                f"{where}: mechanism {e['mechanism']!r}: the server adds Gaussian noise to the "
                "sum of a fixed number of sampled nodes, no amplification by sampling "
                "(gaussian)"
            )
        if e["delta"] != delta:
            problems.append(
                f"{where}: delta {e['delta']!r}, not the configured node_delta {delta:g}"
            )
        used = e["noise_multiplier"]
        if is_number(used) and abs(used / sigma - 1) > NODE_SIGMA_TOLERANCE:
            problems.append(
                f"{where}: noise_multiplier {used:.4g}, but {rounds} rounds at node-level "
                f"epsilon {target:g} and delta {delta:g} calibrate to σ = {sigma:.4g} "
                f"(dp-accounting RDP, within {NODE_SIGMA_TOLERANCE:.0%})"
            )
    return problems


def _missing_rounds(entries: list[dict], completed: int | None) -> list[str]:
    """The completed rounds (``run_end``'s count) without a node-level release."""
    if not isinstance(completed, int):
        return []
    released = {e["round"] for e in entries if is_round(e["round"])}  # others fail entry_problem
    missing = [r for r in range(1, completed + 1) if r not in released]
    if not missing:
        return []
    return [
        f"run_end counts {completed} completed round(s) under node_dp, but round(s) "
        f"{', '.join(map(str, missing))} have no node_level entry: the server releases one "
        "every round before using the model"
    ]


def audit_node_level(
    report: dict,
    entries: list[dict],
    config: dict,
    lines: dict[int, int],
    tolerance: float,
    completed: int | None,
) -> None:
    """Node-level DP: the entries against the run's plan, one per completed round,
    reported vs recomputed epsilon, the node-level budget, and the guarantee. ``completed``:
    ``run_end``'s rounds_completed (None: no run_end)."""
    node_dp = config.get("node_dp") is True
    if not entries and not node_dp:
        return
    problems = [f"line {lines[id(e)]}: {p}" for e in entries if (p := entry_problem(e))]
    if node_dp:
        problems += _missing_rounds(entries, completed)
    if entries and not problems:
        problems += _plan_problems(entries, config, lines)
        curve = accounting.epsilon_curve(entries)
        for e, recomputed in zip(entries, curve, strict=True):
            if e["epsilon"] < recomputed * (1 - tolerance):
                problems.append(
                    f"round {e['round']} (line {lines[id(e)]}): reported node-level "
                    f"epsilon {e['epsilon']:.4f} is below the PLD recomputation "
                    f"{recomputed:.4f}"
                )
        last = entries[-1]
        budget = config.get("node_target_epsilon")
        if is_number(budget) and max(last["epsilon"], curve[-1]) > budget:
            problems.append(
                f"node-level epsilon {max(last['epsilon'], curve[-1]):.4f} exceeds "
                f"the node-level budget {budget:g}"
            )
        report["node_level"] = {
            "epsilon": curve[-1],
            "reported_epsilon": last["epsilon"],
            "delta": last["delta"],
            "rounds": len(entries),
            "unit": last["unit"],
            "rdp_epsilon": accounting.rdp_epsilon(entries, last["delta"]),
            "statement": (
                f"({up(curve[-1], 3)}, {up_significant(last['delta'], 3)})-DP for {last['unit']}"
            ),
        }
        statement = f"node level: {report['node_level']['statement']}"
        report["guarantee"] = (
            f"{report['guarantee']}; {statement}"
            if report["dp"] is not False
            else f"no customer-level guarantee (dp off); {statement}"
        )
    elif not entries:
        report["guarantee"] = "no guarantee established: node_dp is on, but no node-level release"
    report["checks"].append(
        check(
            "node_level",
            "node-level releases as planned, one per round, epsilon >= PLD recomputation",
            problems,
            f"{len(entries)} node-level rounds hold",
        )
    )
