"""Recomputing the ledger's epsilons with an accountant independent of the nodes' one.

The nodes account with Opacus's PRV accountant; the audit recomputes with Google dp-accounting's
privacy loss distributions (PLD, add-or-remove-one neighbours, pessimistic discretisation) and
reports dp-accounting's RDP bound as a looser reference. A ledger contribution is the event

    SelfComposed(PoissonSampled(sample_rate, Gaussian(noise_multiplier)), steps)

(``mechanism == "poisson_subsampled_gaussian"``), or ``SelfComposed(Gaussian(noise_multiplier),
steps)`` for ``mechanism == "gaussian"``: no amplification by sampling is claimed for it, so its
``sample_rate`` is informational (Flower samples a fixed number of nodes, not Poisson).

Federation level, for a customer, at the configured delta where a node used it (or, when each
node chose its own delta, at the largest node delta for one node and at their sum for all
nodes; server/privacy/deltas.py, ``used_delta``; the sum of many small merchants' deltas can
reach 1 / customers, where the statement protects no one: ``deltas.delta_warning`` says so
wherever the statement is made, the server's metrics.json and the audit):
- one node (regional partition): the customer's data lives at one node, the other nodes never see
  it, so the guarantee is that node's; over all customers, the max over nodes. It applies only
  when the run declares a regional partition and every node vouched for it in its signed
  releases (``exclusive_customers``: :func:`unvouched_nodes`): the declaration alone is the
  operator's word;
- all nodes (merchant partition): adding or removing the customer adds or removes one record at
  every node, so every contribution of every node composes (one PLD over all events). With one
  configured delta it is not multiplied: the composed PLD gives epsilon at the same delta.
  Composing the nodes' statements instead (basic composition) gives (sum of epsilons, sum of
  deltas), reported beside it as a cross-check.

The calibration check (:func:`plan_epsilon`, :func:`calibrate_noise`) redoes a node's choice of
noise multiplier for its plan with PLD, independently of the node's Opacus calibration.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from server.privacy.deltas import node_deltas, used_delta
from server.privacy.ledger import is_number
from shared.recommender.training import noise_floor

VALUE_DISCRETIZATION = 1e-4  # PLD grid of privacy-loss values: epsilon accurate to about 1e-4
# The calibration check's grid: 10x faster, epsilon within about 1e-3 above the fine grid's
# (pessimistic discretisation: still an upper bound), far inside the check's 2% margin.
PLAN_DISCRETIZATION = 1e-3
CALIBRATION_PRECISION = 1e-3  # calibrate_noise's bracket on sigma, relative
# split_budget aims this share below the run's target: the nodes calibrate with Opacus's PRV
# accountant, whose noise multiplier was measured up to 0.05% under the PLD calibration's
SPLIT_MARGIN = 0.01
MECHANISMS = ("poisson_subsampled_gaussian", "gaussian")
UNIT_ONE_NODE = "one customer's whole history, the customer shopping at one node only"
UNIT_ALL_NODES = "one customer's data at every node together"


# what the audit recomputes at most, from a ledger it does not trust: one entry's steps (and
# noise multiplier: shared.runs.config.MAX_NOISE_MULTIPLIER), and the steps it composes
# together (one node's entries, or every node's), far above any plan (a node of 10^8
# customers plans 586,000 steps a round at batch 512; a hundred merchants' six rounds state
# about 30,000 together); a tampered entry of 10^9 steps asked the PLD accountant for 111 GiB
# and 10^30 overflowed it (3 x 10^6 steps: about 6 GB)
MAX_ENTRY_STEPS = 1_000_000
MAX_NODE_STEPS = 3_000_000
# an honest release spends at most its node's budget, at most the run's target (itself at most
# shared.runs.config.MAX_TARGET_EPSILON), and dp-accounting's RDP bound, which costs
# microseconds whatever the parameters, was measured at most 1.2 x PLD's epsilon: a release
# whose RDP bound is above RDP_SPARE x target + 1 is no run's, and PLD is never built for it
# (at noise 0.001 one step asked for 38 to 76 GiB)
RDP_SPARE = 2.0


def _params(c: dict) -> tuple[str, float, float, int]:
    """(mechanism, noise_multiplier, sample_rate, steps) of a ledger entry, checked."""
    mechanism = c.get("mechanism")
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r} (known: {', '.join(MECHANISMS)})")
    sigma, q, steps = c.get("noise_multiplier"), c.get("sample_rate"), c.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not is_number(sigma) or sigma < 0:
        raise ValueError(f"noise_multiplier must be a number >= 0, got {sigma!r}")
    if not isinstance(q, int | float) or not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {q!r}")
    return mechanism, float(sigma), float(q), steps


def contribution_event(c: dict) -> Any:
    """The dp-accounting ``DpEvent`` of one ledger contribution (or node_level entry)."""
    import dp_accounting as dpa

    mechanism, sigma, q, steps = _params(c)
    gaussian = dpa.GaussianDpEvent(sigma)
    one_step = gaussian if mechanism == "gaussian" else dpa.PoissonSampledDpEvent(q, gaussian)
    return dpa.SelfComposedDpEvent(one_step, steps)


def contributions_to_dp_event(contributions: list[dict]) -> Any:
    """All contributions as one composed ``DpEvent``: feed it to any dp-accounting accountant."""
    import dp_accounting as dpa

    return dpa.ComposedDpEvent([contribution_event(c) for c in contributions])


@functools.lru_cache(maxsize=512)
def event_pld(
    mechanism: str,
    sigma: float,
    q: float,
    steps: int,
    discretization: float = VALUE_DISCRETIZATION,
) -> Any:
    """The PLD of one contribution, built as ``PLDAccountant`` builds it (None: no privacy cost,
    ``math.inf``: no noise). Cached: a run repeats the same few (sigma, q, steps)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    if steps == 0 or (mechanism != "gaussian" and q == 0):
        return None
    if sigma == 0:
        return math.inf
    if mechanism == "gaussian":
        return pld.from_gaussian_mechanism(
            standard_deviation=sigma / math.sqrt(steps),
            value_discretization_interval=discretization,
        )
    return _subsampled_step(sigma, q, discretization).self_compose(steps)


@functools.lru_cache(maxsize=32)
def _subsampled_step(sigma: float, q: float, discretization: float) -> Any:
    """The PLD of one Poisson subsampled Gaussian step, cached apart from its self-compositions:
    building it is most of a PLD's time (seconds, a Python loop over its grid), and a run's
    statement and its audit compose the same step many times over (each release alone, a
    node's rounds together, every node's together)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=discretization
    )


def _compose(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    if a is math.inf or b is math.inf:
        return math.inf
    return a.compose(b)


def _epsilon(composed: Any, delta: float) -> float:
    if composed is None:
        return 0.0
    if composed is math.inf:
        return math.inf
    return float(composed.get_epsilon_for_delta(delta))


def _composed_pld(contributions: list[dict]) -> Any:
    return functools.reduce(_compose, (event_pld(*_params(c)) for c in contributions), None)


def recompute_epsilon(contributions: list[dict], delta: float) -> float:
    """Epsilon at ``delta`` of all ``contributions`` composed, by dp-accounting PLD.

    Equal to ``PLDAccountant(value_discretization_interval=1e-4)`` composed with
    ``contributions_to_dp_event(contributions)``, only faster (per-contribution PLDs are cached,
    and so is the result: the audit asks the epsilon of each node's every release alone, and
    a node's rounds repeat the same few).
    """
    return _recomputed(tuple(_params(c) for c in contributions), float(delta))


@functools.lru_cache(maxsize=1024)
def _recomputed(releases: tuple[tuple[str, float, float, int], ...], delta: float) -> float:
    return _epsilon(functools.reduce(_compose, (event_pld(*r) for r in releases), None), delta)


def epsilon_curve(contributions: list[dict]) -> list[float]:
    """Cumulative PLD epsilon after each contribution, each at that contribution's own delta."""
    return list(_curve(tuple((_params(c), float(c["delta"])) for c in contributions)))


@functools.lru_cache(maxsize=256)
def _curve(releases: tuple[tuple[tuple[str, float, float, int], float], ...]) -> tuple[float, ...]:
    """:func:`epsilon_curve` of ``releases`` ((mechanism, sigma, q, steps), delta), cached: the
    nodes of a run with equal plans have equal histories, and the audit and the run's statement
    compose the same ones (seconds a node: a composition and an epsilon per release)."""
    composed, curve = None, []
    for params, delta in releases:
        composed = _compose(composed, event_pld(*params))
        curve.append(_epsilon(composed, delta))
    return tuple(curve)


def rdp_epsilon(contributions: list[dict], delta: float) -> float:
    """Epsilon at ``delta`` by dp-accounting's RDP accountant: an upper bound looser than PLD.
    RDP composes by adding, so the releases of one (mechanism, noise, rate) are composed once,
    their steps added (a node's rounds repeat the same few)."""
    steps: Counter = Counter()
    for c in contributions:
        mechanism, sigma, q, n = _params(c)
        steps[(mechanism, sigma, 1.0 if mechanism == "gaussian" else q)] += n
    return _rdp_epsilon(tuple(steps.items()), float(delta))


@functools.lru_cache(maxsize=1024)
def _rdp_epsilon(steps: tuple[tuple[tuple[str, float, float], int], ...], delta: float) -> float:
    """:func:`rdp_epsilon` of ``steps`` ((mechanism, sigma, q), count), cached: a pure function
    the audit asks again for every node of equal plans and every audit of the same ledger."""
    from dp_accounting.rdp import RdpAccountant

    absl = logging.getLogger("absl")  # silence "failed to converge ... excluding this order"
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant()
        releases = [
            {"mechanism": mechanism, "noise_multiplier": sigma, "sample_rate": q, "steps": n}
            for (mechanism, sigma, q), n in steps
        ]
        accountant.compose(contributions_to_dp_event(releases))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def release_rdp_epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """:func:`rdp_epsilon` of one release's parameters (cached there): the audit bounds every
    entry by it before any PLD, and a run repeats the same few."""
    release = {"mechanism": mechanism, "noise_multiplier": sigma, "sample_rate": q}
    return rdp_epsilon([{**release, "steps": steps}], delta)


def plan_steps(dp_batch_size: int, num_customers: float, local_epochs: int) -> tuple[float, int]:
    """(sample rate q, DP-SGD steps per round) a node with ``num_customers`` must use: q =
    min(1, dp_batch_size / num_customers), steps = ceil(1 / q) x local_epochs, as
    ``shared.recommender.training.steps_per_epoch`` computes them."""
    q = min(1.0, dp_batch_size / max(num_customers, 1))
    return q, math.ceil(1.0 / q) * local_epochs


class NodePlan(NamedTuple):
    """A node's private plan as the run's settings and its public customer figure fix it:
    ``rounds`` x ``steps`` DP-SGD steps at Poisson rate ``q``, Gaussian ``releases`` of
    sensitivity 1 as (noise, count) (evaluations, the start guard:
    ``RunConfig.gaussian_releases``), the private encoder rounds' (rate, steps) at the DP-SGD
    noise (None: none), and the node's ``delta``."""

    q: float
    steps: int
    rounds: int
    releases: tuple[tuple[float, int], ...]
    encoder: tuple[float, int] | None
    delta: float


@functools.lru_cache(maxsize=256)
def _plan_pld(
    sigma: float,
    q: float,
    steps: int,
    rounds: int,
    releases: tuple[tuple[float, int], ...],
    encoder: tuple[float, int] | None,
) -> Any:
    grid = PLAN_DISCRETIZATION
    plan = event_pld("poisson_subsampled_gaussian", sigma, q, steps * rounds, grid)
    if encoder is not None:
        plan = _compose(plan, event_pld("poisson_subsampled_gaussian", sigma, *encoder, grid))
    for release_sigma, count in releases:
        plan = _compose(plan, event_pld("gaussian", release_sigma, 1.0, count, grid))
    return plan


@functools.lru_cache(maxsize=256)
def plan_epsilon(
    sigma: float,
    q: float,
    steps: int,
    rounds: int,
    releases: tuple[tuple[float, int], ...],
    delta: float,
    encoder: tuple[float, int] | None = None,
) -> float:
    """PLD epsilon at ``delta`` (grid :data:`PLAN_DISCRETIZATION`) of a node's plan: ``rounds``
    x DP-SGD (``steps`` Poisson subsampled Gaussian steps at rate ``q``, noise ``sigma``)
    composed with the Gaussian ``releases`` of sensitivity 1, (noise, count) each (the
    evaluations and the start guard's comparison), and with ``encoder``: (rate, steps) of the
    private encoder rounds' DP-SGD steps at the same ``sigma`` (None: the run tunes no encoder
    under DP)."""
    return _epsilon(_plan_pld(sigma, q, steps, rounds, releases, encoder), delta)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    rounds: int,
    releases: tuple[tuple[float, int], ...],
    precision: float = CALIBRATION_PRECISION,
    encoder: tuple[float, int] | None = None,
    guess: float | None = None,
) -> float:
    """The audit's own calibration: the smallest noise multiplier (to ``precision``, relative)
    whose plan (:func:`plan_epsilon`) spends at most ``target_epsilon`` at ``delta`` by PLD;
    ``math.inf`` when no noise is enough (the Gaussian releases alone exceed the target).
    ``guess``: where to start looking (the search brackets it within 10%, else widens). No
    noise below the DP-SGD steps' floor (``noise_floor``: a closed-form lower bound) keeps the
    target, so PLD, whose time and memory grow as the noise falls, is never built there. Inside
    the bracket the search interpolates (:func:`_next_noise`): a PLD a step, about 5 in all
    where bisection to 0.1% built 13."""
    floor = noise_floor(target_epsilon, delta, q, steps * rounds)
    tried: list[tuple[float, float]] = []  # (sigma, epsilon) with epsilon known, in order

    def spent(sigma: float) -> float:
        if sigma < floor:  # PLD's epsilon, above the true one, is above the target too
            return math.inf
        epsilon = plan_epsilon(sigma, q, steps, rounds, releases, delta, encoder)
        tried.append((sigma, epsilon))
        return epsilon

    low, high = (0.25, 1.0) if guess is None else (guess / 1.1, guess * 1.1)
    while spent(low) <= target_epsilon and low > 1e-3:
        low, high = low * low / high, low
    while spent(high) > target_epsilon:
        if high > 1e4:
            return math.inf
        low, high = high, high * high / low
    slow = 0  # interpolations in a row that did not halve the bracket
    while high / low > 1 + precision:  # spent(high) fits, spent(low) not, unless low is tiny
        width = math.log(high / low)
        sigma = _next_noise(low, high, tried[-2:], target_epsilon, precision, slow >= 3)
        if spent(sigma) <= target_epsilon:
            high = sigma
        else:
            low = sigma
        slow = slow + 1 if math.log(high / low) > width / 2 else 0
    return high


def _next_noise(
    low: float,
    high: float,
    last: list[tuple[float, float]],
    target: float,
    precision: float,
    bisect: bool,
) -> float:
    """The next noise :func:`calibrate_noise` tries between ``low`` (above ``target``) and
    ``high`` (within it): where the line through the ``last`` two tries, log epsilon against
    log sigma, meets the target, a half ``precision`` above (so that the try a ``precision``
    below ``high`` then closes the bracket); the bracket's geometric middle when ``bisect`` or
    when the tries give no falling line."""
    middle = math.sqrt(low * high)
    if bisect or len(last) < 2:
        return middle
    (s1, e1), (s2, e2) = last
    if not (s1 != s2 and 0 < e1 != e2 > 0 and math.isfinite(e1 * e2)):
        return middle
    slope = math.log(e2 / e1) / math.log(s2 / s1)
    if slope >= 0:
        return middle
    # in logs, capped before the power is taken: a near-flat line overflowed it (a float power)
    aim = math.log(s2 * (1 + precision / 2)) + math.log(target / e2) / slope
    under = high / (1 + precision * (1 - 1e-6))  # the bracket closes if it does not fit
    return min(max(math.exp(min(aim, math.log(under))), low * (high / low) ** 0.02), under)


def split_budget(
    target_epsilon: float, plans: list[NodePlan], delta: float | None, precision: float = 0.01
) -> float:
    """The largest budget (to ``precision``, relative, from below) every node of ``plans`` may
    be asked to keep such that all their plans, each calibrated to it at the node's own delta
    (:func:`calibrate_noise`), composed (one PLD, as :func:`federation_guarantee` composes a
    customer's data at every node) spend at most ``target_epsilon`` less
    :data:`SPLIT_MARGIN` at ``delta`` (None, or one above every node's, :func:`used_delta`:
    the sum of the nodes' deltas).

    The composed epsilon is close to a power of the budget, so the search interpolates in
    log-log between the budgets that fit and do not (from the equal share, which basic
    composition keeps, up to the target), and each node's calibration starts from its noise at
    the nearest budget tried; equal plans are composed by self-composition. Each noise
    multiplier is composed at the low end of its calibration's bracket, a little below the
    node's own: the composition is never understated."""
    counts = Counter(plans)
    delta = used_delta(delta, (plan.delta for plan in plans))
    at = delta if delta is not None else sum(plan.delta for plan in plans)
    goal = target_epsilon * (1 - SPLIT_MARGIN)
    tried: dict[NodePlan, tuple[float, float]] = {}  # plan -> (budget, sigma) last calibrated

    def composed_epsilon(budget: float) -> float:
        composed = None
        for plan, count in counts.items():
            last = tried.get(plan)
            sigma = calibrate_noise(
                budget,
                plan.delta,
                plan.q,
                plan.steps,
                plan.rounds,
                plan.releases,
                encoder=plan.encoder,
                guess=None if last is None else last[1] * last[0] / budget,
            )
            if sigma is math.inf:
                return math.inf
            tried[plan] = (budget, sigma)
            sigma /= 1 + CALIBRATION_PRECISION  # the bracket's low end: the node's sigma is above
            pld = _plan_pld(sigma, plan.q, plan.steps, plan.rounds, plan.releases, plan.encoder)
            composed = _compose(composed, pld.self_compose(count) if count > 1 else pld)
        return _epsilon(composed, at)

    low, high = target_epsilon / max(len(plans), 1), target_epsilon
    spent_high = composed_epsilon(high)
    if spent_high <= goal:
        return high
    spent_low = composed_epsilon(low)
    while spent_low > goal:  # the equal share within the margin (never seen: PLD is tighter)
        if low < 1e-3 * target_epsilon:
            raise ValueError(
                f"no budget per node keeps {len(plans)} nodes' plans within epsilon "
                f"{target_epsilon:g} (their evaluation and guard releases alone may exceed it)"
            )
        low, high, spent_high = low / 2, low, spent_low
        spent_low = composed_epsilon(low)
    while high / low > 1 + precision:  # spent(low) <= goal < spent(high)
        if spent_low > 0 and math.isfinite(spent_high):
            share = math.log(goal / spent_low) / math.log(spent_high / spent_low)
        else:
            share = 0.5
        guess = low * (high / low) ** min(max(share, 0.02), 0.98)
        # just under the interpolated budget; once that fits, one step of ``precision`` up
        budget = min(max(guess / (1 + precision / 2), low * (1 + precision / 4)), high)
        for _ in range(3):  # then interpolate again
            if budget >= high:
                break
            spent = composed_epsilon(budget)
            if spent > goal:
                high, spent_high = budget, spent
                break
            low, spent_low = budget, spent
            budget = low * (1 + precision)
    return low


def federation_guarantee(
    contributions: list[dict], delta: float | None, partition: str, silent: Iterable[str] = ()
) -> dict:
    """The customer-level guarantee of the whole federation, both ways; ``silent``: nodes
    whose spending counts although they signed no release (:func:`unvouched_nodes`).

    ``one_node``: max over nodes (a customer at one node only), each node's epsilon the larger
    of its reported and its recomputed one; ``all_nodes``: every node's contributions composed
    (a customer who may shop at all nodes). ``applies`` names the one for ``partition``:
    ``one_node`` for "regional", ``all_nodes`` for anything else (the safe side).

    ``delta``: one delta for the whole federation, or None when each node chose its own
    (:func:`node_deltas`; also a delta above every node's, which no node used:
    :func:`used_delta`): then ``one_node`` is stated at the largest node delta and
    ``all_nodes`` at the sum of the node deltas (docs/privacy-audit.md says why).
    """
    by_node: dict[str, list[dict]] = defaultdict(list)
    for c in contributions:
        by_node[str(c["node"])].append(c)
    deltas = node_deltas(contributions)
    delta = used_delta(delta, deltas.values())
    one_delta = delta if delta is not None else max(deltas.values(), default=0.0)
    all_delta = delta if delta is not None else sum(deltas.values())
    node_plds = {node: _composed_pld(cs) for node, cs in by_node.items()}
    # never below what the node itself reported: the larger of its accountant's and the PLD's
    per_node = {
        node: max(_epsilon(p, one_delta), *(float(c.get("epsilon") or 0.0) for c in by_node[node]))
        for node, p in node_plds.items()
    }
    composed = functools.reduce(_compose, node_plds.values(), None)
    # every node together is never below what one node reported itself (each at its own delta)
    reported = (float(c.get("epsilon") or 0.0) for c in contributions)
    all_nodes = max(_epsilon(composed, all_delta), *reported)
    unvouched = unvouched_nodes(contributions, silent=silent)  # verified each on arrival
    return guarantee_statement(
        per_node, all_nodes, delta, one_delta, all_delta, partition, unvouched
    )


def unvouched_nodes(
    contributions: list[dict],
    believed: Callable[[dict], bool] = lambda c: True,
    silent: Iterable[str] = (),
) -> list[str]:
    """The nodes of ``contributions`` and ``silent`` that did not vouch, in every release they
    signed, that their customers are their own alone (``exclusive_customers`` true:
    client/policy.py, ``exclusive-customers``), sorted. A release without the field (a node of
    before 2026-12-07) vouches for nothing, nor does a copy the server made (``recovered``,
    ``outstanding``: the node signed none), nor a ``silent`` node (one whose unanswered
    requests count as spent although it signed no release: ``unbounded``); ``believed`` says
    whose statement counts (the audit's: a release whose signature verified against its
    node's key)."""
    nodes = {str(c["node"]) for c in contributions} | set(map(str, silent))
    signed: dict[str, list[dict]] = defaultdict(list)
    for c in contributions:
        if not (c.get("recovered") or c.get("outstanding")):
            signed[str(c["node"])].append(c)
    return sorted(
        node
        for node in nodes
        if not signed[node]
        or not all(c.get("exclusive_customers") is True and believed(c) for c in signed[node])
    )


def _applies_why(partition: str, unvouched: list[str], nodes: int) -> str:
    """Why the statement that applies does, in plain words."""
    if partition != "regional":
        return (
            f"the run declares a {partition or 'unnamed'} partition: a customer may have data "
            "at every node, so every node's spending composes"
        )
    if not unvouched:
        return (
            "the run declares a regional partition and every node vouched in its signed "
            "releases that its customers are its own alone: each customer's data is at one "
            "node, so the worst node's guarantee holds (parallel composition)"
        )
    named = ", ".join(unvouched[:5]) + (", ..." if len(unvouched) > 5 else "")
    return (
        f"the run declares a regional partition, but {len(unvouched)} of its {nodes} nodes "
        f"({named}) did not vouch in their signed releases that their customers are their "
        "own alone (the node's exclusive-customers): the declaration is the operator's word, "
        "a customer may have data at several nodes, so every node's spending composes"
    )


def guarantee_statement(
    per_node: dict[str, float],
    composed: float,
    delta: float | None,
    one_delta: float,
    all_delta: float,
    partition: str,
    unvouched: list[str],
    how: str = "",
) -> dict:
    """The federation's guarantee both ways, from figures computed elsewhere: ``per_node``
    (each node's epsilon at ``one_delta``) and ``composed`` (all nodes' contributions composed,
    at ``all_delta``); ``applies`` names the one that holds: ``one_node`` for a "regional"
    ``partition`` whose every node vouched for it (no ``unvouched`` node:
    :func:`unvouched_nodes`), else ``all_nodes`` (the safe side), and ``why`` says why in
    words; ``how`` is added to both explanations. Only the statement: the writer
    (:func:`federation_guarantee`) and the audit (server/privacy/audit_federation.py) each
    compute its figures their own way."""
    worst = max(per_node, key=per_node.get, default=None)
    applies = "one_node" if partition == "regional" and not unvouched else "all_nodes"
    result = {
        "partition": partition,
        "unvouched": unvouched,
        "delta": delta,
        "per_node": per_node,
        "one_node": {
            "epsilon": per_node[worst] if worst is not None else 0.0,
            "delta": one_delta,
            "unit": UNIT_ONE_NODE,
            "how": "parallel composition: the worst node"
            + (f" ({worst})" if worst is not None else "")
            + how,
        },
        "all_nodes": {
            "epsilon": composed,
            "delta": all_delta,
            "unit": UNIT_ALL_NODES,
            "how": f"all {len(per_node)} nodes' contributions composed (one PLD{how})",
            "basic_composition": {
                "epsilon": sum(per_node.values()),
                "delta": delta * len(per_node) if delta is not None else all_delta,
            },
        },
        "applies": applies,
        "why": _applies_why(partition, unvouched, len(set(per_node) | set(unvouched))),
    }
    result["epsilon"] = result[applies]["epsilon"]
    result["unit"] = result[applies]["unit"]
    return result
