"""The nodes' PRV accountant (shared/recommender/prv_domain.py): Opacus's, its domain sizing
cached, and every number the same as Opacus's own to the bit."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from shared.recommender.prv_domain import prv_accountant_class, rdp_epsilon, rdp_of_one_step
from shared.recommender.training import PRV_RELATIVE_ERROR, new_accountant, prv_epsilon

# a tiny node's two training rounds and its guard's answer (sample rate 1), and a merchant's
# small sample rate over many steps
HISTORIES = (
    [(2.2188891347698516, 0.449438202247191, 9), (3.7735924528226414, 1.0, 1)],
    [(0.9, 0.01, 400), (1.3, 0.02, 50)],
)


@pytest.mark.parametrize("history", HISTORIES)
def test_the_domain_and_the_epsilon_are_opacus_own(history: list) -> None:
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    steps = [n for _, _, n in history]
    for eps_error, delta_error in ((0.01, 1e-6), (2.5e-4, 1e-7)):
        ours = prv_accountant_class()()._get_domain(prvs, steps, eps_error, delta_error)
        theirs = PRVAccountant()._get_domain(prvs, steps, eps_error, delta_error)
        assert (ours.t_min, ours.t_max, ours.size) == (theirs.t_min, theirs.t_max, theirs.size)
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert rdp_epsilon(history, 1e-5) == rdp.get_epsilon(1e-5)
    plain = PRVAccountant()
    plain.history = list(history)
    cached = new_accountant(plain.state_dict())
    assert isinstance(cached, PRVAccountant) and cached.mechanism() == "prv"
    assert cached.get_epsilon(1e-5) == plain.get_epsilon(1e-5)


def test_the_rdp_of_a_step_is_computed_once_and_cannot_be_changed() -> None:
    rdp_of_one_step.cache_clear()
    first = rdp_of_one_step(1.1, 0.05)
    assert rdp_of_one_step(1.1, 0.05) is first
    assert rdp_of_one_step.cache_info().hits == 1
    with pytest.raises(ValueError, match="read-only"):
        first *= 2


@pytest.fixture
def domains(monkeypatch) -> list[int]:
    """How many PRVs each epsilon the nodes' accountant computes composes, one item a call."""
    domains: list[int] = []
    accountant_class = prv_accountant_class()
    sized = accountant_class._get_domain

    def counting(self, prvs, **sizing):  # noqa: ANN001, ANN003, ANN202
        domains.append(len(prvs))
        return sized(self, prvs=prvs, **sizing)

    monkeypatch.setattr(accountant_class, "_get_domain", counting)
    return domains


def test_a_nodes_epsilon_composes_one_prv_per_noise_and_rate_not_per_release(domains):
    """A node's history holds an entry per release, and every cheap answer a server asked for
    (noise 1e6) added a PRV to each of its epsilons: 200 made each take 80 s instead of 3.
    Entries of one (noise, sample rate) are composed as one, their steps added: the same
    epsilon as the merged history's."""
    rounds, answers = [(2.0, 0.05, 120)] * 3, [(1e6, 1.0, 1)] * 40
    releases = new_accountant()
    releases.history = [*rounds, *answers, *rounds]
    epsilon = prv_epsilon(releases, 1e-5)
    assert domains and set(domains) == {2}
    merged = new_accountant()
    merged.history = [(2.0, 0.05, 720), (1e6, 1.0, 40)]
    assert epsilon == prv_epsilon(merged, 1e-5)


def test_private_answers_at_many_noises_compose_as_one_gaussian(domains):
    """From the review: entries merged only where their noise was the same float, so a server
    asking each cheap answer at another noise (1e6, 1e6 + 1, ...) brought back one PRV per
    answer (60 of them: each epsilon 7.9 s instead of 0.3 s). Gaussian releases compose
    exactly into one Gaussian: one PRV for them all, the epsilon Opacus gives the history as
    it is (both upper bounds, the node's at its half-percent error: never below)."""
    from opacus.accountants import PRVAccountant

    rounds = [(2.0, 0.05, 120)] * 2
    answers = [(3.0 + i / 10, 1.0, 1 + i % 2) for i in range(6)]
    releases = new_accountant()
    releases.history = [*rounds, *answers, *rounds]
    epsilon = prv_epsilon(releases, 1e-5)
    assert domains and set(domains) == {2}
    opacus = PRVAccountant()
    opacus.history = [*rounds, *answers, *rounds]
    with np.errstate(divide="ignore"):
        finer = opacus.get_epsilon(1e-5, eps_error=1e-3)
    assert finer <= epsilon <= finer * (1 + 2 * PRV_RELATIVE_ERROR)
