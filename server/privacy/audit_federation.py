"""The audit's federation statement, its budget checks and metrics.json's claims.

The audit composes the federation's guarantee itself, the ledger's events composed as
dp-accounting's ``PLDAccountant`` composes them (the same epsilon to the bit), not with the
function the server wrote metrics.json with (``accounting.federation_guarantee``). A
contribution missing from a node's indices (before its first one here, or in a gap) is accounted
at the node's costliest release, as the server records a lost one
(server/privacy/ledger_gaps.py), and no statement is below an epsilon a node reported itself. A
private request a node left unanswered and no later release settled
(server/privacy/ledger_gaps.py, ``outstanding_requests``) is composed as its node's costliest
release of that purpose (an answer it never gave: its plan's one, :func:`counted_release`);
while one of a node's is bounded by none of its releases, the guarantee is at least the run's
target. The worst node's guarantee applies only to a regional run whose every node vouched for
it in releases whose signature verified (``accounting.unvouched_nodes``). The budget each node
was asked to keep is re-derived with ``accounting.split_budget`` from the nodes' plans."""

from __future__ import annotations

import functools
import math
import reprlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from server.privacy import accounting
from server.privacy.audit_calibration import GUARD_KEYS, _guard_sigma, _plan, _releases
from server.privacy.audit_checks import by_node, check, entry_problem, is_number
from server.privacy.claims import Claim, planned_floor, refused_claims, with_claims
from server.privacy.deltas import declared_customers, delta_warning, node_deltas, used_delta
from server.privacy.ledger import json_object
from server.privacy.ledger_gaps import planned_answer, request_purpose
from shared.runs.config import MAX_TARGET_EPSILON
from shared.runs.rounding import up, up_significant

DP_SGD = ("training", "encoder")
# a node whose indices jump further than this is not composed: its epsilon is unbounded
MAX_MISSING = 1000


def _release_epsilon(c: dict) -> float:
    return accounting.recompute_epsilon([c], float(c["delta"]))


def missing_releases(cs: list[dict]) -> tuple[int, dict | None]:
    """How many of a node's contribution indices up to its last are not in ``cs``, and the
    release they are accounted at: the node's costliest among its training and encoder
    releases (the largest epsilon alone); None when it has none (a missing one could be a
    DP-SGD round: nothing here bounds it)."""
    indices = {c["contribution_index"] for c in cs if isinstance(c["contribution_index"], int)}
    if not indices:
        return 0, None
    missing = max(indices) + 1 - len(indices)
    dp_sgd = [c for c in cs if c.get("purpose", "training") in DP_SGD]
    return missing, max(dp_sgd, key=_release_epsilon) if missing and dp_sgd else None


def _pld_epsilon(events: list[tuple[dict, int]], delta: float) -> float:
    """Epsilon at ``delta`` of ``events`` ((release, times) each) composed as dp-accounting's
    own ``PLDAccountant`` composes them, equal releases self-composed."""
    if any(times > MAX_MISSING for _, times in events):
        return math.inf
    steps: Counter = Counter()
    for c, times in events:
        q = 1.0 if c["mechanism"] == "gaussian" else float(c["sample_rate"])
        steps[(c["mechanism"], float(c["noise_multiplier"]), q)] += c["steps"] * times
    if sum(steps.values()) > accounting.MAX_NODE_STEPS:
        return math.inf  # more than any plan states: not composed (the checks say why)
    return _composed_epsilon(tuple(steps.items()), float(delta))


@functools.lru_cache(maxsize=1024)
def _composed_epsilon(
    steps: tuple[tuple[tuple[str, float, float], int], ...], delta: float
) -> float:
    """:func:`_pld_epsilon` of the self-composed ``steps`` ((mechanism, sigma, q), n), in
    order: what ``PLDAccountant`` (grid ``VALUE_DISCRETIZATION``) gives for them, to the bit
    (tests/server/test_ledger_audit.py), its steps' PLDs built as it builds them but shared with the
    run's statement and the audit's other checks (``accounting.event_pld``: building them was
    most of an audit's time). Cached per process: a pure function, seconds a call, and the
    audit composes the same events per node and for all nodes, run after run of the same
    plan."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    composed = pld.identity(accounting.VALUE_DISCRETIZATION)  # the accountant's start
    for (mechanism, sigma, q), n in steps:
        event = accounting.event_pld(mechanism, sigma, q, n)
        if event is math.inf:
            return math.inf
        composed = composed if event is None else composed.compose(event)
    return float(composed.get_epsilon_for_delta(delta))


def counted_release(cs: list[dict], purpose: str, config: dict) -> dict | None:
    """The release an unanswered request of ``purpose`` by the node of contributions ``cs`` is
    counted at: its costliest of that purpose; for an answer it never released, the one
    Gaussian answer the run's plan (``config``) gives it; None when nothing here bounds it (a
    DP-SGD purpose it never released: its sample rate and steps there are not in the
    ledger, or no contribution at all)."""
    alike = [c for c in cs if c.get("purpose", "training") == purpose]
    if alike:
        return max(alike, key=_release_epsilon)
    sigma = None
    if cs and purpose == "evaluation":
        sigma = config.get("eval_noise_multiplier")
    elif cs and purpose == "guard":
        key = next((k for k in GUARD_KEYS if is_number(config.get(k))), None)
        customers = cs[-1].get("num_customers")
        if key is not None and is_number(customers):
            sigma = _guard_sigma({"guard": (key, config[key])}, float(customers))
    if is_number(sigma) and sigma > 0:
        return {**cs[-1], **planned_answer(purpose, float(sigma))}
    return None


def federation_statement(
    contributions: list[dict],
    delta: float | None,
    partition: str,
    outstanding: dict[str, list[dict]] | None = None,
    config: dict | None = None,
    believed: Callable[[dict], bool] = lambda c: False,
    claimants: Iterable[str] = (),
    at: float | None = None,
) -> dict:
    """The customer-level guarantee both ways, as ``accounting.federation_guarantee`` states it
    (same keys), but composed here: ``one_node`` the worst node, ``all_nodes`` one PLD over
    every node's events; missing indices accounted (:func:`missing_releases`), each
    ``outstanding`` request (node -> its unanswered entries) at :func:`counted_release` (the run's
    ``config`` gives the plan), and neither below the largest epsilon a node reported. A
    node's statement that its customers are its own alone counts where ``believed`` (by
    default nowhere: the safe side); ``claimants``, the nodes whose reports the server
    refused, vouched for nothing where they signed no release here. ``at``: both ways at this
    delta instead (what the metrics check reads a statement at another delta against)."""
    nodes = by_node(contributions)
    deltas = node_deltas(contributions)
    delta = used_delta(delta, deltas.values()) if at is None else at
    one_delta = delta if delta is not None else max(deltas.values(), default=0.0)
    all_delta = delta if delta is not None else sum(deltas.values())
    events: dict[str, list[tuple[dict, int]]] = {}
    accounted = 0
    unanswered, unbounded = 0, set(outstanding or {}) - set(nodes)
    for node, cs in nodes.items():
        count, template = missing_releases(cs)
        events[node] = [(c, 1) for c in cs] + ([(template, count)] if template else [])
        accounted += count if template else 0
        if count and template is None:
            unbounded.add(node)
        for request in (outstanding or {}).get(node, []):
            counted = counted_release(cs, request_purpose(request), config or {})
            if counted is None:
                unbounded.add(node)
            else:
                events[node].append((counted, 1))
                unanswered += 1
    reported = {node: max(float(c["epsilon"]) for c in cs) for node, cs in nodes.items()}
    per_node = {node: max(_pld_epsilon(events[node], one_delta), reported[node]) for node in nodes}
    every = [event for node_events in events.values() for event in node_events]
    composed = max([_pld_epsilon(every, all_delta), *reported.values()]) if nodes else 0.0
    extra = f", {accounted} missing contribution(s) at their node's costliest" if accounted else ""
    if unanswered:
        extra += f", {unanswered} unanswered request(s) counted as spent"
    silent = (unbounded | set(claimants)) - set(nodes)
    unvouched = accounting.unvouched_nodes(contributions, believed, silent)
    statement = accounting.guarantee_statement(
        per_node, composed, delta, one_delta, all_delta, partition, unvouched, extra
    )
    return {
        **statement,
        "missing_accounted": accounted,
        "outstanding_accounted": unanswered,
        "unbounded": sorted(unbounded),
    }


def audit_federation(
    report: dict,
    contributions: list[dict],
    config: dict,
    tolerance: float,
    outstanding: dict[str, list[dict]] | None = None,
    believed: Callable[[dict], bool] = lambda c: False,
) -> Callable[[float], float] | None:
    """The federation guarantee (at the configured delta, or, configured 0, at the nodes'
    own), counting ``outstanding`` requests (node -> unanswered entries) as spent, each node's
    vouch for its partition counted where ``believed`` (its signature verified); the
    ``federation_budget`` check: it within the run's target, and the stated
    ``budget_per_node`` not above what ``split_budget`` gives for the nodes' plans; the
    ``delta_meaning`` warning. Returns the guarantee's epsilon at any looser delta, established
    the same way (:func:`audit_metrics` reads a statement at another delta against it), None
    where no guarantee is established."""
    # without a run_start (report["dp"] None) each node's own delta, as a configured 0
    config_delta = config.get("delta") if report["dp"] is not None else 0.0
    if any(entry_problem(c) for c in contributions):
        report["guarantee"] = "not established: some contributions cannot be recomputed"
        return None
    if not (is_number(config_delta) and 0 <= config_delta < 1):
        report["guarantee"] = "no federation guarantee: the configured delta is unusable"
        return None
    partition = str(config.get("partition", ""))
    claims = refused_claims(report.get("unverified", []))
    restate = functools.partial(
        federation_statement,
        contributions,
        config_delta or None,
        partition,
        outstanding,
        config,
        believed,
        claims,
    )
    plain = restate()
    fed = with_claims(plain, claims)
    report["federation"] = fed
    if partition == "regional" and fed["unvouched"]:
        report["notes"].append(_unvouched_note(fed, contributions))
    applies = fed[fed["applies"]]
    target = config.get("target_epsilon")
    floors = [0.0]  # what the statement is at least, at any delta
    if fed["unbounded"] and is_number(target):
        # what their plans keep: the target where each node's budget was a share of it; where
        # every node was asked the whole target (regional) but the composition applies (a node
        # did not vouch), the target at each node that spent (a refused one's too), composed
        # basically
        whole = partition == "regional" and fed["applies"] == "all_nodes"
        spent = set(fed["per_node"]) | set(fed["unbounded"]) | set(claims)
        floor = planned_floor(float(target), len(spent) if whole else 1, claims)
        fed["epsilon"] = max(fed["epsilon"], floor)
        floors.append(floor)
        report["notes"].append(
            f"node(s) {', '.join(fed['unbounded'])} left private requests unanswered that no "
            "release of theirs here bounds (never contributed, or never released one of that "
            "purpose): what they spent is not in this ledger; the guarantee is stated at least "
            f"at {floor:g} (the run's target {target:g}"
            + (" at each node" if whole else "")
            + "), what their plans keep if they followed them"
            + (", plus every refused report's claim" if claims else "")
        )
    elif fed["unbounded"]:  # and no target to state it at: nothing here bounds it
        fed["epsilon"] = math.inf
        floors.append(math.inf)
    _claims_note(report, claims, fed)
    title = "the guarantee that applies within the run's target epsilon"
    if not (is_number(target) and 0 < target <= MAX_TARGET_EPSILON):
        # nothing to hold it to (splitting 1e308 over a merchant run's nodes took hours: fuzzed)
        problem = (
            f"run_start's target_epsilon {reprlib.repr(target)} is not a number in "
            f"(0, {MAX_TARGET_EPSILON:g}]: no run plans it"
        )
        report["checks"].append(check("federation_budget", title, [problem], ""))
    else:
        over = (
            [f"the federation's epsilon {fed['epsilon']:.4f} exceeds the run's target {target:g}"]
            if fed["epsilon"] > target * (1 + 1e-9)
            else []
        )
        asked, ok = report.get("budget_per_node"), f"{fed['epsilon']:.3f} <= {target:g}"
        if partition != "regional" and asked is not None:
            problem, said = _budget_problem(asked, contributions, config, tolerance)
            over += [problem] if problem else []
            report["notes"] += [said] if said and not problem else []
        report["checks"].append(check("federation_budget", title, over, f"{ok} ({applies['how']})"))
    report["guarantee"] = (
        f"({up(fed['epsilon'], 3)}, {up_significant(applies['delta'], 3)})-DP for {fed['unit']} "
        f"({applies['how']})"
    )
    _delta_meaning(report, applies["delta"], declared_customers(contributions))
    return functools.partial(_epsilon_at, restate, claims, plain, max(floors))


def _epsilon_at(
    restate: Callable[..., dict], claims: dict[str, Claim], plain: dict, floor: float, delta: float
) -> float:
    """The epsilon of the guarantee that applies, stated at ``delta`` (math.inf where none
    reaches it): ``restate(at=...)`` composes the ledger at another delta, ``claims`` are
    counted as :func:`audit_federation` counts them (their deltas add to the composition's,
    so it is read at ``delta`` less theirs; the worst node's is never below a claim's), and
    the statement is never below ``floor``, an epsilon at the guarantee's delta: sound only
    at a ``delta`` at least that. ``plain``: the statement before the claims."""
    key = plain["applies"]
    added = with_claims(plain, claims)[key]["delta"] - plain[key]["delta"]
    at = delta - added if key == "all_nodes" else delta
    if not 0 < at < 1:
        return math.inf
    counted = with_claims(restate(at=at), claims)
    if counted[key]["delta"] > delta * (1 + 1e-9):
        return math.inf
    return max(counted["epsilon"], floor)


def _delta_meaning(report: dict, delta: float, customers: int) -> None:
    """The ``delta_meaning`` check, a warning and never a failure: the guarantee's ``delta``
    below 1 / the ``customers`` it covers at most (server/privacy/deltas.py); the guarantee
    line says so where it is not."""
    warning = delta_warning(delta, customers)
    report["federation"] |= {"warning": warning, "customers": customers}
    if warning:
        report["guarantee"] += f" (WARNING: delta at least 1/{customers}: see delta_meaning)"
    report["checks"].append(
        check(
            "delta_meaning",
            "the guarantee's delta is below 1 / the customers it covers",
            [warning] if warning else [],
            f"delta {delta:.3g} < 1/{customers} (the customers the nodes declared)"
            if customers
            else "no node declared its customers: not judged",
            "warn" if warning else None,
        )
    )


def _claims_note(report: dict, claims: dict[str, Claim], fed: dict) -> None:
    """Say how what refused reports claim spent (``unverified``) was counted (as the server's
    statement counts it: server/privacy/claims.py)."""
    if not claims:
        return
    largest = max(epsilon for epsilon, _ in claims.values())
    how = (
        "added to every node's composed spending"
        if fed["applies"] == "all_nodes"
        else "the worst node's guarantee is stated at no less"
    )
    report["notes"].append(
        f"refused reports of {len(claims)} node(s) claim epsilon up to {largest:g} spent "
        f"('unverified'), never recomputed: {how}"
    )


def _unvouched_note(fed: dict, contributions: list[dict]) -> str:
    """Why a regional run is stated at the composition over all nodes, in plain words, with
    what the ledger shows of the nodes' statements."""
    stated = [c for c in contributions if "exclusive_customers" in c]
    if not stated:
        return (
            f"{fed['why']}. No release here states it: a ledger from before nodes vouched for "
            "their partition (2026-12-07) is taken as not vouched, the safe side; its target "
            "and metrics.json meant the worst node, so the federation_budget and metrics "
            "checks may fail for that alone"
        )
    silent = sorted(set(fed["unvouched"]) - {str(c["node"]) for c in contributions})
    return (
        f"{fed['why']}. A node's statement counts only in releases whose signature verifies "
        "against its key (node-keys, --node-keys DIR) and where it says true in every one"
        + (
            f"; {', '.join(silent)} left requests unanswered and signed no release here"
            if silent
            else ""
        )
    )


def _budget_problem(
    asked: Any, contributions: list[dict], config: dict, tolerance: float
) -> tuple[str | None, str | None]:
    """(problem, note) of the run's stated budget per node against ``split_budget`` over the
    contributing nodes' plans (each from its declared customers)."""
    target = float(config["target_epsilon"])
    if not (is_number(asked) and 0 < asked <= target):
        return f"run_start states budget_per_node {asked!r}, not in (0, {target:g}]", None
    customers = {node: cs[-1]["num_customers"] for node, cs in by_node(contributions).items() if cs}
    expected = int(config.get("num_nodes") or config.get("clients") or 0)
    new_format = any("purpose" in c for c in contributions)
    plan, _ = _plan(config, new_format, [])
    if (
        plan is None
        or len(customers) != expected
        or not all(is_number(n) and n >= 1 for n in customers.values())
    ):
        return None, (
            f"budget_per_node {asked:g} not re-derived: {len(customers)} of {expected} nodes "
            "declared their customers in the ledger, or the config lacks the plan"
        )
    plans = []
    config_delta = config.get("delta") or 0.0
    for n in customers.values():
        q, steps = accounting.plan_steps(plan["dp_batch_size"], n, plan["local_epochs"])
        encoder = None
        if plan["encoder"] is not None:
            batch, encoder_rounds = plan["encoder"]
            encoder_q, encoder_steps = accounting.plan_steps(batch, n, 1)
            encoder = (encoder_q, encoder_steps * encoder_rounds)
        delta = min([1.0 / (10 * max(n, 1))] + ([config_delta] if config_delta else []))
        releases = _releases(plan, n)
        plans.append(accounting.NodePlan(q, steps, plan["rounds"], releases, encoder, delta))
    try:
        fair = accounting.split_budget(target, plans, config_delta or None)
    except ValueError as error:
        return f"budget_per_node {asked:g}: {error}", None
    if asked > fair * (1 + tolerance):
        return (
            f"run_start states budget_per_node {asked:.4g}, above the {fair:.4g} that "
            f"split_budget gives for the {len(plans)} nodes' plans within target {target:g}"
        ), None
    return None, None


def audit_metrics(
    report: dict,
    path: Path,
    tolerance: float,
    epsilon_at: Callable[[float], float] | None = None,
) -> None:
    """metrics.json's privacy statement must not claim less than the audit recomputes: its
    (epsilon, delta) implied by the guarantee that applies (all nodes composed unless the run
    is regional and every node vouched for it in signed releases), at the guarantee's delta
    or, by ``epsilon_at`` (:func:`audit_federation`'s), at the one it states
    (:func:`_statement_problems`); under DP it states every contributing node's final epsilon
    (``per_node``), each equal to the ledger's."""
    try:
        privacy = _object_at(json_object(path.read_bytes()), "privacy")
        claimed_node = _object_at(privacy, "node_level")
    except (OSError, ValueError) as error:
        report["checks"].append(
            check("metrics", "metrics.json privacy statement", [f"{path}: {error}"], "")
        )
        return
    problems: list[str] = []
    fed = report["federation"]
    claimed, claimed_delta = privacy.get("epsilon"), privacy.get("delta")
    if fed and is_number(claimed):
        problems = _statement_problems(report, claimed, claimed_delta, tolerance, epsilon_at)
    elif fed and claimed is not None:
        problems.append(f"metrics.json's epsilon {str(claimed)[:40]!r} is not a number")
    elif report["dp"] is not False and is_number(claimed):
        problems.append(
            f"metrics.json claims epsilon {claimed:.4f}, but the audit established no guarantee"
        )
    problems += _per_node_problems(report, privacy.get("per_node"), tolerance)
    _unwarned(report, privacy)
    node_level = report["node_level"]
    if is_number(claimed_node.get("epsilon")):
        if not node_level and report["config"].get("node_dp") is True:
            problems.append(
                f"metrics.json claims node-level epsilon {claimed_node['epsilon']:.4f}, but the "
                "ledger holds no node-level release to recompute it from"
            )
        elif node_level and claimed_node["epsilon"] < node_level["epsilon"] * (1 - tolerance):
            problems.append(
                f"metrics.json claims node-level epsilon {claimed_node['epsilon']:.4f}, "
                f"below the recomputed {node_level['epsilon']:.4f}"
            )
    if fed or report["dp"] is not False or claimed_node:
        report["checks"].append(
            check(
                "metrics",
                "metrics.json agrees with the ledger",
                problems,
                "the privacy statement in metrics.json holds",
            )
        )


def _statement_problems(
    report: dict,
    claimed: float,
    delta: Any,
    tolerance: float,
    epsilon_at: Callable[[float], float] | None,
) -> list[str]:
    """metrics.json's stated (``claimed`` epsilon, ``delta``) against the guarantee that
    applies. (epsilon, delta)-DP implies (epsilon', delta') for every epsilon' >= epsilon and
    delta' >= delta, and the recomputed epsilon falls as delta grows: a statement holds when
    its epsilon is at least the one recomputed at its own delta, at or above the guarantee's
    (there the floors :func:`_epsilon_at` keeps, the plan's epsilon and the nodes' own, still
    hold), but not at a looser delta of at least 1 / the customers covered
    (:func:`delta_warning`: there epsilon near 0 holds, and the card would show it), nor
    where the nodes declared no customers to judge it by. Any smaller delta fails: those
    floors are epsilons at the guarantee's delta, and at a smaller one the spending they
    stand for costs more (a statement at the ledger's composition at 1e-7, below a node's
    plan there, passed until 2026-12-08). An epsilon stated without its delta reads as pure
    DP, which no Gaussian release meets; a delta outside (0, 1) states nothing."""
    fed = report["federation"]
    applies = fed[fed["applies"]]
    established, unit = applies["delta"], f"for {applies['unit']} ({applies['how']})"
    if delta is None:
        return [
            f"metrics.json states an epsilon without its delta (the guarantee's is "
            f"{established:.3g}): read alone it claims pure DP"
        ]
    if not is_number(delta):
        return [f"metrics.json's delta {str(delta)[:40]!r} is not a number"]
    if abs(delta - established) <= tolerance * established:
        if claimed < fed["epsilon"] * (1 - tolerance):
            return [
                f"metrics.json claims epsilon {claimed:.4f}, below the recomputed guarantee "
                f"{fed['epsilon']:.4f} {unit}, which applies: {fed['why']}"
            ]
        return []
    if not 0 < delta < 1:
        return [f"metrics.json states delta {delta:.3g}, not a probability in (0, 1)"]
    customers = fed.get("customers", 0)
    if delta > established and not (customers >= 1 and delta * customers < 1):
        return [
            f"metrics.json states delta {delta:.3g}, above the guarantee's {established:.3g} "
            f"and not below 1 / the {customers} customers declared: restated there, any epsilon "
            f"(its {claimed:.4g}) may protect no one ({delta_warning(delta, customers) or '-'})"
        ]
    if delta < established:
        return [
            f"metrics.json states delta {delta:.3g}, below the guarantee's {established:.3g} "
            f"{unit}, which applies: {fed['why']}; at a smaller delta the epsilon is larger, and "
            "what bounds it here (a node's own epsilon, a plan's) holds only at the guarantee's "
            "delta or above"
        ]
    recomputed = epsilon_at(delta) if epsilon_at is not None else math.inf
    if claimed < recomputed * (1 - tolerance):
        return [
            f"metrics.json states delta {delta:.3g}, above the guarantee's {established:.3g}, "
            f"and epsilon {claimed:.4f}, below the {recomputed:.4f} recomputed at that delta "
            f"{unit}, which applies: {fed['why']}"
        ]
    report["notes"].append(
        f"metrics.json states ({claimed:.4g}, {delta:.3g})-DP, at another delta than the "
        f"guarantee's {established:.3g}: it holds (epsilon recomputed at {delta:.3g}: "
        f"{recomputed:.4g})"
    )
    return []


def _unwarned(report: dict, privacy: dict) -> None:
    """Add to the ``delta_meaning`` warning that metrics.json (and so the model card, which
    prints its statement) does not carry it (``privacy.warning``), where the guarantee's
    delta protects no one: a reader of the card is not told (removed, or a run of before
    2026-12-08)."""
    fed = report["federation"]
    if not (fed and fed.get("warning")) or privacy.get("warning"):
        return
    (found,) = [c for c in report["checks"] if c["name"] == "delta_meaning"]
    found["problems"].append(
        "metrics.json states no such warning (privacy.warning), so neither does the model "
        "card: its reader is not told"
    )
    found["message"] = f"{len(found['problems'])} warning(s)"


def _object_at(block: dict, key: str) -> dict:
    """``block[key]``, a JSON object ({} when absent or null); ValueError naming it when it is
    something else (a tampered metrics.json)."""
    value = block.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"its {key} is not a JSON object but {str(value)[:40]!r}")
    return value


def _per_node_problems(report: dict, per_node: Any, tolerance: float) -> list[str]:
    """metrics.json's ``per_node`` against the ledger: under DP it must be there and name
    exactly the contributing nodes, each at its last contribution's epsilon and, where it
    states one, at no smaller a delta than that contribution's (:func:`_node_delta_problem`)."""
    ledger_final = {n["node"]: n.get("reported_epsilon") for n in report["nodes"]}
    ledger_delta = {n["node"]: n.get("delta") for n in report["nodes"]}
    contributed = {n["node"] for n in report["nodes"] if n["contributions"]}
    if not isinstance(per_node, dict):
        if report["dp"] is not False:
            return [
                "metrics.json states no per_node epsilons: under DP it must state each node's "
                "final epsilon (what catches a ledger whose last rounds were cut off)"
            ]
        return []
    problems = []
    stated: dict[str, Any] = defaultdict(lambda: None)
    for node, value in per_node.items():
        stated[str(node)] = value.get("epsilon") if isinstance(value, dict) else value
    for node in sorted(set(stated) | contributed):
        value, final = stated[node], ledger_final.get(node)
        if node not in contributed:
            problems.append(f"node {node}: metrics.json states it, the ledger has no contribution")
        elif not is_number(final):
            continue  # a contribution the recomputed check reports
        elif not is_number(value):
            problems.append(f"node {node}: metrics.json states no epsilon for it")
        elif abs(value - final) > tolerance * final:
            problems.append(
                f"node {node}: metrics.json states epsilon {value:.4f}, the ledger's "
                f"last contribution {final:.4f} (a cut-off ledger?)"
            )
        elif problem := _node_delta_problem(per_node.get(node), ledger_delta.get(node), tolerance):
            problems.append(f"node {node}: {problem}")
    return problems


def _node_delta_problem(value: Any, delta: Any, tolerance: float) -> str | None:
    """What a node's statement in metrics.json's ``per_node`` (``value``: its epsilon, or an
    object of its epsilon and delta) claims beyond its last contribution's ``delta``: a delta
    that is not a number, or one below it, where the same epsilon claims more (its epsilon at
    1e-12 on the card passed until 2026-12-08); a bare epsilon is at the ledger's delta."""
    if not isinstance(value, dict) or "delta" not in value or not is_number(delta):
        return None
    stated = value["delta"]
    if not is_number(stated):
        return f"metrics.json's delta {str(stated)[:40]!r} for it is not a number"
    if stated < delta * (1 - tolerance):
        return (
            f"metrics.json states delta {stated:.3g} for it, below its releases' {delta:.3g}: "
            "at a smaller delta its epsilon is larger than the one stated"
        )
    return None
