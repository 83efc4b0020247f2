"""The start guard's verdict (server/federation/guard.py): the public start is shipped only
where the nodes' summed private answers say, beyond their noise, that the rounds did harm, and
no node's answer counts for more than its customers could move it."""

from __future__ import annotations

import math

import pytest
from helpers import node_reply, release

from server.federation.guard import ANSWER_SPREAD, GUARD_MARGIN, bounded_answer, decide
from shared.runs.config import RunConfig

CONFIG = RunConfig(dp=True)  # dp-guard on, the default noise scale


def guard_release(**changes) -> dict:
    """A node's guard release of 100 customers as its privacy report carries it."""
    guard = {"purpose": "guard", "mechanism": "gaussian", "noise_multiplier": 4.0}
    return release(
        **{**guard, "sample_rate": 1.0, "steps": 1, "update_digest": "", "round": 3, **changes}
    )


def test_the_start_ships_only_below_the_margin_of_the_summed_noise() -> None:
    stds = [20.0, 20.0, 5.0, 5.0]  # two large nodes and two small ones
    noise = math.sqrt(sum(s**2 for s in stds))  # the sum's std: its variances add
    just_below = -GUARD_MARGIN * noise - 1
    verdict = decide([(just_below / len(stds), s) for s in stds])
    assert verdict["shipped"] == "start" and verdict["nodes"] == len(stds)
    assert verdict["noise_std"] == pytest.approx(noise)
    assert verdict["noisy_gain"] == pytest.approx(just_below)
    # a loss within the noise, or any gain, keeps the rounds' model
    assert decide([((just_below + 2) / len(stds), s) for s in stds])["shipped"] == "rounds"
    assert decide([(30.0, 20.0), (-5.0, 20.0)])["shipped"] == "rounds"
    # no answer: nothing says the rounds did harm
    assert decide([]) == {
        "nodes": 0,
        "shipped": "rounds",
        "why": "no node answered the comparison",
    }


def test_the_guard_noise_grows_with_the_root_of_a_nodes_customers() -> None:
    """Each node's std is the scale x sqrt(its customers), so the summed answer's std is the
    scale x sqrt(all customers) however they are split: ten nodes of 100 are judged as
    finely as one node of 1,000."""
    scale = CONFIG.dp_guard_noise_scale
    assert CONFIG.guard_noise(2_200) == pytest.approx(scale * math.sqrt(2_200))
    ten = decide([(0.0, CONFIG.guard_noise(100))] * 10)["noise_std"]
    one = decide([(0.0, CONFIG.guard_noise(1_000))])["noise_std"]
    assert ten == pytest.approx(one) == pytest.approx(scale * math.sqrt(1_000))
    # in every node's plan at its own std
    assert CONFIG.gaussian_releases(400) == ((scale * 20.0, 1),)
    assert RunConfig(dp=True, dp_guard=False).gaussian_releases(400) == ()


def test_an_answer_is_bounded_by_what_its_customers_could_move_it() -> None:
    sigma = CONFIG.guard_noise(100)  # the release's 100 customers
    bound = 100 + ANSWER_SPREAD * sigma  # ... plus four noise stds

    def answer(value: object, declared: float = math.inf, **changes) -> float | None:
        privacy = guard_release(**changes)
        reply = node_reply("n1", None, privacy=privacy, metrics={"noisy_gain": value})
        bounded = bounded_answer(reply, CONFIG, declared)
        return None if bounded is None else bounded[0]

    assert answer(-12.5) == -12.5
    assert answer(-1e9) == -bound  # a lying node that would force the start alone
    assert answer(1e9) == bound  # ... or keep a harmful model alone
    # the registry's figure rules, for the bound and for the std the answer is judged at
    assert answer(1e9, declared=50) == 50 + ANSWER_SPREAD * CONFIG.guard_noise(50)
    claimed = guard_release(num_customers=10**9)  # claiming more customers than registered
    reply = node_reply("n1", None, privacy=claimed, metrics={"noisy_gain": 0.0})
    assert bounded_answer(reply, CONFIG, 50) == (0.0, CONFIG.guard_noise(50))
    assert answer(float("nan")) is None and answer(float("inf")) is None
    assert answer(-12.5, purpose="evaluation") is None  # not a guard release
    assert answer(-12.5, mechanism="laplace") is None  # a report that does not parse
    # a release the audit could not recompute (parsed, refused on arrival): no answer either
    assert answer(-12.5, sample_rate=0.0) is None and answer(-12.5, noise_multiplier=0.0) is None


def test_ten_lying_answers_cannot_outweigh_the_honest_sum_beyond_their_bound() -> None:
    """Nine honest nodes whose customers clearly lost (the start ships) and one node lying as
    far as it may: its bounded answer moves the sum by its customers plus four stds, no more."""
    sigma = CONFIG.guard_noise(100)
    honest = [(-60.0, sigma)] * 9  # -540 against a noise std of 13 over ten nodes of 100
    liar = node_reply("liar", None, privacy=guard_release(), metrics={"noisy_gain": 1e12})
    bounded = bounded_answer(liar, CONFIG, math.inf)
    assert bounded == (100 + ANSWER_SPREAD * sigma, sigma)
    assert decide([*honest, bounded])["shipped"] == "start"
