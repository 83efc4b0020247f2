"""The start guard's verdict (server/federation/guard.py): the public start is shipped only
where the nodes' summed private answers say, beyond their noise, that the rounds did harm, and
no node's answer counts for more than its customers could move it."""

from __future__ import annotations

import math

import pytest
from helpers import node_reply, release

from server.federation.guard import ANSWER_SPREAD, GUARD_MARGIN, bounded_answer, decide


def guard_release(**changes) -> dict:
    """A node's guard release as its privacy report carries it."""
    guard = {"purpose": "guard", "mechanism": "gaussian", "noise_multiplier": 20.0}
    return release(
        **{**guard, "sample_rate": 1.0, "steps": 1, "update_digest": "", "round": 3, **changes}
    )


def test_the_start_ships_only_below_the_margin_of_the_summed_noise() -> None:
    sigma, nodes = 20.0, 4
    noise = sigma * math.sqrt(nodes)
    just_below = -GUARD_MARGIN * noise - 1
    verdict = decide([just_below / nodes] * nodes, sigma)
    assert verdict["shipped"] == "start" and verdict["nodes"] == nodes
    assert verdict["noise_std"] == pytest.approx(noise)
    assert verdict["noisy_gain"] == pytest.approx(just_below)
    # a loss within the noise, or any gain, keeps the rounds' model
    assert decide([(just_below + 2) / nodes] * nodes, sigma)["shipped"] == "rounds"
    assert decide([30.0, -5.0], sigma)["shipped"] == "rounds"
    # no answer: nothing says the rounds did harm
    assert decide([], sigma) == {
        "nodes": 0,
        "shipped": "rounds",
        "why": "no node answered the comparison",
    }


def test_an_answer_is_bounded_by_what_its_customers_could_move_it() -> None:
    sigma = 20.0
    bound = 100 + ANSWER_SPREAD * sigma  # the release's 100 customers, plus four noise stds

    def answer(value: object, declared: float = math.inf, **changes) -> float | None:
        privacy = guard_release(**changes)
        reply = node_reply("n1", None, privacy=privacy, metrics={"noisy_gain": value})
        return bounded_answer(reply, sigma, declared)

    assert answer(-12.5) == -12.5
    assert answer(-1e9) == -bound  # a lying node that would force the start alone
    assert answer(1e9) == bound  # ... or keep a harmful model alone
    assert answer(1e9, declared=50) == 50 + ANSWER_SPREAD * sigma  # the registry's figure rules
    assert answer(float("nan")) is None and answer(float("inf")) is None
    assert answer(-12.5, purpose="evaluation") is None  # not a guard release
    assert answer(-12.5, mechanism="laplace") is None  # a report that does not parse


def test_ten_lying_answers_cannot_outweigh_the_honest_sum_beyond_their_bound() -> None:
    """Nine honest nodes whose customers clearly lost (the start ships) and one node lying as
    far as it may: its bounded answer moves the sum by its customers plus four stds, no more."""
    sigma = 20.0
    honest = [-60.0] * 9  # -540 against a noise std of 63 over ten nodes
    liar = node_reply("liar", None, privacy=guard_release(), metrics={"noisy_gain": 1e12})
    bounded = bounded_answer(liar, sigma, math.inf)
    assert bounded == 100 + ANSWER_SPREAD * sigma
    assert decide([*honest, bounded], sigma)["shipped"] == "start"
