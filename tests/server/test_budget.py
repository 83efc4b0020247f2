"""The budget each node is asked to keep (server/federation/budget.py)."""

from __future__ import annotations

import functools
import math

import pytest

from server.federation.budget import node_budget, node_plan
from server.privacy import accounting
from shared.recommender.training import calibrate_noise, noise_floor, planned_epsilon
from shared.runs.config import RunConfig
from tests.helpers import release

MERCHANTS = RunConfig(
    dp=True,
    partition="merchant",
    clients=3,
    target_epsilon=2.0,
    dp_rounds=2,
    dp_local_epochs=1,
    dp_batch_size=64,
)
CUSTOMERS = [300, 500, 500]  # two equal plans: composed by self-composition


def test_the_start_guard_is_part_of_every_private_plan_the_split_composes() -> None:
    """A guarded run's plan holds the guard's one comparison (and the evaluations when the
    nodes evaluate); the split then asks each merchant a little less than without it."""
    guard = MERCHANTS.dp_guard_noise_scale * math.sqrt(300)  # a node of 300 customers
    assert node_plan(MERCHANTS, 300).releases == ((guard, 1),)
    evaluated = RunConfig(**{**MERCHANTS.to_dict(), "federated_eval": True})
    assert node_plan(evaluated, 300).releases == ((10.0, 2), (guard, 1))
    unguarded = RunConfig(**{**MERCHANTS.to_dict(), "dp_guard": False})
    assert node_plan(unguarded, 300).releases == ()
    assert node_budget(MERCHANTS, CUSTOMERS) < node_budget(unguarded, CUSTOMERS)


def test_a_regional_node_keeps_the_whole_budget_and_unknown_merchants_an_equal_share() -> None:
    regional = RunConfig(dp=True, clients=3, target_epsilon=2.0)
    assert node_budget(regional, CUSTOMERS) == 2.0
    assert node_budget(MERCHANTS) == pytest.approx(2.0 / 3)
    assert node_budget(MERCHANTS, [300, None, 500]) == pytest.approx(2.0 / 3)


def test_merchants_are_asked_the_largest_budget_whose_composition_keeps_the_target() -> None:
    """Composed by PLD, three merchants' plans at an equal share spend far less than the
    target; the budget asked is the largest that spends it, with the nodes' own calibration
    (Opacus PRV) as well as the audit's (PLD), and no more."""
    asked = node_budget(MERCHANTS, CUSTOMERS)
    assert asked > 1.5 * MERCHANTS.target_epsilon / 3
    plans = [node_plan(MERCHANTS, c) for c in CUSTOMERS]
    total_delta = sum(plan.delta for plan in plans)

    def composed(budget: float, node_sigma: bool = False) -> float:
        plds = []
        for plan in plans:
            if node_sigma:  # what each node itself will use
                steps = plan.steps * plan.rounds
                sigma = calibrate_noise(budget, plan.delta, plan.q, steps, plan.releases)
                spent = planned_epsilon(sigma, plan.delta, plan.q, steps, plan.releases)
                assert spent <= budget
            else:
                sigma = accounting.calibrate_noise(
                    budget, plan.delta, plan.q, plan.steps, plan.rounds, plan.releases
                )
            plds.append(
                accounting._plan_pld(sigma, plan.q, plan.steps, plan.rounds, plan.releases, None)
            )
        return accounting._epsilon(functools.reduce(accounting._compose, plds), total_delta)

    assert composed(asked, node_sigma=True) <= MERCHANTS.target_epsilon
    assert composed(asked) <= MERCHANTS.target_epsilon
    assert composed(asked * 1.03) > MERCHANTS.target_epsilon * (1 - accounting.SPLIT_MARGIN)


def test_the_run_states_the_budget_it_asked_and_a_resumed_run_reads_it_back(
    tmp_path, monkeypatch
) -> None:
    """The first start of a merchant run computes the budget from its partitions' public
    figures and writes it into the ledger's run_start; the nodes are sent it; a resumed run
    takes it from there (the search takes minutes at a hundred nodes) and asks the same."""
    from types import SimpleNamespace

    from server.federation import exchange
    from shared.federation.node_directory import NodeInfo

    partitions = tmp_path / "partitions"
    for k, customers in enumerate(CUSTOMERS):
        (partitions / f"node-{k}").mkdir(parents=True)
        NodeInfo(node=f"merchant-{k}", partition="merchant", customers=customers).write(
            partitions / f"node-{k}"
        )
    catalog = SimpleNamespace(digest="d" * 64, items=None)
    first = exchange.Federation(None, MERCHANTS, tmp_path, catalog, partitions, None)
    asked = node_budget(MERCHANTS, CUSTOMERS)
    assert first.budget == pytest.approx(asked)
    assert first.ledger.entries[0]["budget_per_node"] == first.budget
    assert first.settings["target_epsilon"] == first.budget

    def not_again(*args, **kwargs):
        raise AssertionError("a resumed run computes the budget again")

    monkeypatch.setattr(exchange, "node_budget", not_again)
    resumed = exchange.Federation(None, MERCHANTS, tmp_path, catalog, partitions, None)
    assert resumed.budget == first.budget and len(resumed.ledger.entries) == 1


def recorded_noise(monkeypatch) -> list[float]:  # noqa: ANN001
    """The noise of every plan the audit's calibration asks PLD for, from now on."""
    asked: list[float] = []
    spent = accounting.plan_epsilon

    def recorded(sigma: float, *args) -> float:
        asked.append(sigma)
        return spent(sigma, *args)

    monkeypatch.setattr(accounting, "plan_epsilon", recorded)
    return asked


def test_the_audits_calibration_skips_the_noise_below_the_floor_and_finds_the_same(
    monkeypatch,
) -> None:
    """A large budget sent the audit's calibration down to noise 0.0625, where PLD took the
    longest (about half the calibration's time, and its memory grows as the noise falls):
    no noise below the DP-SGD steps' floor keeps the target, so PLD is never built there, and
    the noise found is as right: the smallest that keeps the target, to the precision, as is
    the one found building PLD below the floor (they agree to the precision: the search
    interpolates from the epsilons it knows, and below the floor it knows none)."""
    plan = (60.0, 2e-4, 0.128, 8, 2, ((8.94427190999916, 1),))
    floor = noise_floor(60.0, 2e-4, 0.128, 16)
    asked = recorded_noise(monkeypatch)
    found = accounting.calibrate_noise(*plan)
    assert 0.0625 < floor < found and min(asked) >= floor
    monkeypatch.setattr(accounting, "noise_floor", lambda *args: 0.0)
    unpruned = accounting.calibrate_noise(*plan)
    assert min(asked) == 0.0625
    monkeypatch.undo()
    assert is_calibrated(found, *plan) and is_calibrated(unpruned, *plan)
    assert abs(found / unpruned - 1) <= accounting.CALIBRATION_PRECISION


def is_calibrated(sigma: float, target, delta, q, steps, rounds, releases) -> bool:  # noqa: ANN001
    """Whether ``sigma`` is the smallest noise whose plan keeps ``target``, to the precision."""
    below = sigma / (1 + accounting.CALIBRATION_PRECISION)
    spent = functools.partial(accounting.plan_epsilon, q=q, steps=steps, rounds=rounds)
    at = spent(sigma, releases=releases, delta=delta)
    return at <= target < spent(below, releases=releases, delta=delta)


@pytest.mark.parametrize(
    "plan",
    [
        (4 / 3, 1.25e-4, 0.08, 13, 3, ((20.0, 3),)),  # a merchant's share, evaluations
        (0.2, 1.2e-4, 512 / 2236, 15, 6, ()),  # a small budget: a large noise
        (8.0, 1e-5, 0.02, 50, 4, ((20.0, 4),)),
    ],
)
def test_the_audits_calibration_finds_the_smallest_noise_in_a_few_plds(monkeypatch, plan) -> None:
    """Bisection to 0.1% built 12 or 13 PLDs a calibration (about 0.3 s each, seconds at a
    small noise); the search now interpolates (log epsilon is close to linear in log sigma)
    and finds the smallest noise, to the precision, in at most 7."""
    asked = recorded_noise(monkeypatch)
    sigma = accounting.calibrate_noise(*plan)
    assert len(set(asked)) <= 7
    monkeypatch.undo()
    assert is_calibrated(sigma, *plan)


def test_the_audits_calibration_survives_a_nearly_flat_line_through_its_last_tries(
    monkeypatch,
) -> None:
    """Two tries above the target whose epsilons differ in the 13th digit (a PLD's
    discretization can flatten the curve so) drew a line whose power overflowed: an
    OverflowError out of the calibration. The next try is capped to the bracket first."""
    monkeypatch.setattr(
        accounting, "plan_epsilon", lambda s, *a, **k: 3.0 - 1e-13 * s if s < 2.0 else 1.0
    )
    sigma = accounting.calibrate_noise(2.0, 1e-5, 0.01, 10, 1, ())
    assert 2.0 <= sigma <= 2.0 * (1 + accounting.CALIBRATION_PRECISION)


def test_a_run_delta_no_node_used_neither_splits_the_budget_nor_states_the_run() -> None:
    """Each node takes the smaller of the run's delta and its own (1 / (10 x customers)): at a
    run's delta of 0.5 no node used it, and asking merchants' budgets or stating the run at it
    gave each merchant the whole target and a composition of ten nodes (5.39 at the nodes'
    own deltas) stated at the largest node's own epsilon."""
    loose = RunConfig(**{**MERCHANTS.to_dict(), "delta": 0.5})
    assert all(node_plan(loose, c).delta == 1 / (10 * c) for c in CUSTOMERS)
    assert node_budget(loose, CUSTOMERS) == node_budget(MERCHANTS, CUSTOMERS) < 2.0
    contributions = [
        release(node=str(n), noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
        for n in range(10)
    ]
    own = accounting.federation_guarantee(contributions, None, "merchant")
    assert own["epsilon"] > 5
    for delta in (0.5, 0.01, 1e-4):
        stated = accounting.federation_guarantee(contributions, delta, "merchant")
        assert stated["epsilon"] == own["epsilon"]
        assert stated["all_nodes"]["delta"] == own["all_nodes"]["delta"] == 1e-4
    # a run's delta a node used (at or below its own) is the statements' one delta
    used = accounting.federation_guarantee(contributions, 1e-5, "merchant")
    assert used["all_nodes"]["delta"] == 1e-5 and used["epsilon"] > own["epsilon"]
