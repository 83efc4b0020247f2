"""The audit's calibration check: each node's sample rates, steps and noise multiplier are what
the run's plan and its declared customers imply, its sigma redone by the audit's own PLD
calibration (docs/privacy-audit.md, "The calibration check")."""

from __future__ import annotations

import math
from collections import defaultdict

from server.privacy import accounting
from server.privacy.audit_checks import by_node, check, entry_problem, is_number
from shared.runs.config import MAX_TARGET_EPSILON

# At sigma x (1 - INFLATION_MARGIN) a node's plan must spend more than its target: its sigma is
# the calibrated one, not a larger number written to lower its accounted epsilon.
INFLATION_MARGIN = 0.02
PLAN_KEYS = ("rounds", "dp_batch_size", "local_epochs")
GUARD_KEYS = ("dp_guard_noise_scale", "dp_guard_noise")


def _guard_sigma(plan: dict, customers: float) -> float | None:
    """The start guard's noise the plan gives a node of ``customers`` declared customers
    (``RunConfig.guard_noise``, recomputed from the ledger's config); None: no guard."""
    if plan["guard"] is None:
        return None
    key, value = plan["guard"]
    return value * math.sqrt(max(customers, 1)) if key == "dp_guard_noise_scale" else value


def _releases(plan: dict, customers: float) -> tuple[tuple[float, int], ...]:
    """The Gaussian releases of sensitivity 1 in the plan of a node of ``customers``."""
    releases = [(plan["eval_sigma"], plan["rounds"])] if plan["eval_sigma"] is not None else []
    guard = _guard_sigma(plan, customers)
    return tuple(releases + ([(guard, 1)] if guard is not None else []))


def _is_count(x: object) -> bool:
    """Whether ``x`` is a usable count of the plan: an integer >= 1 a float holds (a batch of
    400 digits overflowed the sample rate's division)."""
    return isinstance(x, int) and is_number(x) and x >= 1


def _plan(config: dict, new_format: bool, notes: list[str]) -> tuple[dict | None, list[str]]:
    """The run's plan from its run_start config, or None with the problem (new-format ledgers)
    or a note (older ledgers, whose configs may predate the plan keys)."""
    lacking = [k for k in PLAN_KEYS if not _is_count(config.get(k))]
    # a private run's rounds and epochs a round: dp_rounds, dp_local_epochs (older ledgers:
    # rounds, local_epochs)
    private = {k: config.get(f"dp_{k}", config.get(k)) for k in ("rounds", "local_epochs")}
    lacking += [f"dp_{k}" for k, v in private.items() if not _is_count(v)]
    eval_sigma = config.get("eval_noise_multiplier")
    if new_format and not (is_number(eval_sigma) and eval_sigma > 0):
        lacking.append("eval_noise_multiplier")
    if not lacking:
        plan = {**{k: config[k] for k in PLAN_KEYS}, **private}
        # the nodes plan evaluation releases only when the run evaluates at the nodes (older
        # ledgers record none: their nodes planned training alone), and the start guard's one
        # comparison when the run guards its start (ledgers from before it: no dp_guard key)
        evaluates = new_format and config.get("federated_eval", True) and is_number(eval_sigma)
        guards = config.get("dp") is True and config.get("dp_guard") is True
        guards = guards and not config.get("node_dp")  # as RunConfig.guards_start
        # the guard's noise: dp_guard_noise_scale x sqrt(a node's declared customers); ledgers
        # of the first guard (2026-12-06) hold one std for every node, dp_guard_noise
        guard = next(((key, config[key]) for key in GUARD_KEYS if is_number(config.get(key))), None)
        if guards and not (guard and guard[1] > 0):
            text = f"run_start config lacks a usable {' or '.join(GUARD_KEYS)}"
            return None, [f"{text}: the noise calibration cannot be checked"]
        plan["eval_sigma"] = float(eval_sigma) if evaluates else None
        plan["guard"] = (guard[0], float(guard[1])) if guards and guard else None
        # private encoder rounds (text-finetune-layers under dp): dp_encoder_batch customers a
        # step, one expected pass a round, text_finetune_rounds rounds
        tunes = config.get("dp") and config.get("text_finetune_layers")
        encoder = (config.get("dp_encoder_batch"), config.get("text_finetune_rounds"))
        if tunes and not all(map(_is_count, encoder)):
            text = "run_start config lacks usable dp_encoder_batch, text_finetune_rounds"
            return None, [f"{text}: the noise calibration cannot be checked"]
        plan["encoder"] = encoder if tunes else None
        return plan, []
    text = f"run_start config lacks usable {', '.join(lacking)}: the noise calibration"
    if new_format:
        return None, [f"{text} cannot be checked"]
    notes.append(f"{text} was not checked (a ledger from before signed contributions)")
    return None, []


def _dp_sgd_problem(c: dict, plan: dict, tolerance: float) -> str | None:
    """What is wrong with a training or encoder contribution's sample rate, steps or noise
    multiplier against the plan its node's declared customers imply (None: nothing). One noise
    multiplier covers the node's whole plan: its training, its encoder rounds and its
    evaluations."""
    purpose = c.get("purpose", "training")
    if c["mechanism"] != "poisson_subsampled_gaussian":
        return f"{purpose} mechanism {c['mechanism']!r}, not poisson_subsampled_gaussian"
    if purpose == "encoder" and plan["encoder"] is None:
        return "an encoder release, but the run's plan tunes no encoder under DP"
    customers = c["num_customers"]
    if not (is_number(customers) and customers > 0):
        return f"num_customers {customers!r}: no plan to check against"
    q, steps = accounting.plan_steps(plan["dp_batch_size"], customers, plan["local_epochs"])
    expected = (q, steps, "dp_batch_size", plan["dp_batch_size"], "dp_local_epochs")
    encoder = None
    if plan["encoder"] is not None:
        batch, encoder_rounds = plan["encoder"]
        encoder_q, encoder_steps = accounting.plan_steps(batch, customers, 1)
        encoder = (encoder_q, encoder_steps * encoder_rounds)
        if purpose == "encoder":
            expected = (encoder_q, encoder_steps, "dp_encoder_batch", batch, "1 pass a round")
    rate, count, batch_key, batch, passes = expected
    if not math.isclose(c["sample_rate"], rate, rel_tol=1e-9):
        return (
            f"sample_rate {c['sample_rate']:g}, but {batch_key} {batch} / "
            f"{customers:g} declared customers gives {rate:g}"
        )
    if c["steps"] != count:
        return f"steps {c['steps']}, but the plan gives ceil(1 / {rate:g}) x {passes} = {count}"
    target, delta, sigma = c["target_epsilon"], c["delta"], c["noise_multiplier"]
    if not is_number(target):
        return None  # the budget check reports it
    if not 0 < target <= MAX_TARGET_EPSILON:  # calibrating for 1e308 ran for hours (fuzzed)
        return f"target_epsilon {target:g} is outside (0, {MAX_TARGET_EPSILON:g}]: no run plans it"
    rounds, releases = plan["rounds"], _releases(plan, customers)
    planned = rounds * (steps + sum(count for _, count in releases)) + (encoder or (0, 0))[1]
    if planned > accounting.MAX_NODE_STEPS:  # a tampered config must not exhaust the audit
        return f"the plan's {planned:,} steps and answers are more than the audit recomputes"

    def spent(s: float) -> float:
        return accounting.plan_epsilon(s, q, steps, rounds, releases, delta, encoder)

    if spent(sigma) > target * (1 + tolerance):
        verdict = (
            f"noise_multiplier {sigma:.4g} is too small: the plan spends ε = {spent(sigma):.3f} "
            f"> target {target:g}"
        )
    elif spent(sigma * (1 - INFLATION_MARGIN)) <= target:
        verdict = (
            f"noise_multiplier {sigma:.4g} is inflated: at {1 - INFLATION_MARGIN:.0%} of it the "
            f"plan still spends only ε = {spent(sigma * (1 - INFLATION_MARGIN)):.3f} <= target "
            f"{target:g}"
        )
    else:
        return None
    calibrated = accounting.calibrate_noise(
        target, delta, q, steps, rounds, releases, encoder=encoder
    )
    return (
        f"{verdict} (plan: {rounds} rounds x {steps} steps at q = {q:.4g}"
        + (f" + {encoder[1]} encoder steps at q = {encoder[0]:.4g}" if encoder else "")
        + "".join(f" + {count} Gaussian release(s) at σ {sigma:g}" for sigma, count in releases)
        + f", δ = {delta:.3g}; the audit's PLD calibration gives σ = {calibrated:.4g})"
    )


def _release_problem(c: dict, plan: dict) -> str | None:
    """What is wrong with an evaluation or start-guard release against the run's plan: one
    Gaussian answer of sensitivity 1 at the plan's noise (None: nothing)."""
    purpose = c["purpose"]
    if purpose == "evaluation":
        sigma = plan["eval_sigma"]
    else:
        customers = c.get("num_customers")
        if not (is_number(customers) and customers > 0):
            return f"num_customers {customers!r}: no plan to check against"
        sigma = _guard_sigma(plan, customers)
    if sigma is None:
        return f"{purpose} release, but the run's plan holds none"
    expected = {
        "mechanism": "gaussian",
        "steps": 1,
        "sample_rate": 1.0,
        "max_grad_norm": 1.0,
        "noise_multiplier": sigma,
    }
    wrong = [f"{k} {c.get(k)!r} (expected {v!r})" for k, v in expected.items() if c.get(k) != v]
    return f"{purpose} release with {', '.join(wrong)}" if wrong else None


def audit_calibration(
    report: dict, contributions: list[dict], config: dict, lines: dict[int, int], tolerance: float
) -> None:
    """Each contribution's sample rate, steps and noise multiplier are what the run's plan and
    the node's declared customers imply, its sigma checked by the audit's own PLD calibration."""
    new_format = any("purpose" in c for c in contributions)
    plan, problems = _plan(config, new_format, report["notes"])
    if plan is None and not problems:
        return
    found: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for node, cs in (by_node(contributions) if plan else {}).items():
        for c in cs:
            if entry_problem(c):
                continue  # the recomputed check reports it
            purpose = c.get("purpose", "training")
            if purpose in ("training", "encoder"):
                problem = _dp_sgd_problem(c, plan, tolerance)
            elif purpose in ("evaluation", "guard"):
                problem = _release_problem(c, plan)
            else:
                problem = f"purpose {purpose!r} is not training, encoder, evaluation or guard"
            if problem:
                found[(node, problem)].append(c)
    for (node, problem), cs in found.items():
        where = ", ".join(str(lines[id(c)]) for c in cs)
        rounds = sorted({c["round"] for c in cs})
        problems.append(
            f"node {node}, line{'s' * (len(cs) > 1)} {where} (round"
            f"{'s' * (len(rounds) > 1)} {', '.join(map(str, rounds))}): {problem}"
        )
    report["checks"].append(
        check(
            "calibration",
            "noise calibrated for the plan (dp-accounting PLD)",
            problems,
            f"every node's sample rate, steps and noise multiplier are its plan's (σ within "
            f"{INFLATION_MARGIN:.0%} of the audit's PLD calibration)",
        )
    )
