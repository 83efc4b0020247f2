"""The nodes' validation answers and the round they choose in a deployment
(server/federation/validation.py): the median over nodes of each node's gain over the start,
weighted by customers, which nodes holding less than half the weight cannot move beyond the
honest nodes' gains, and which keeps the mean's round wherever the nodes rank rounds alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import node_reply

from server.federation.registry import RegisteredNode, Registry
from server.federation.selection import RoundSelection, round_validation
from server.federation.strategy import FedRecStrategy
from server.federation.validation import robust_validation, validation_mean, weighted_median
from shared.runs.config import RunConfig


def answer(users: float, ndcg: float, hr: float | None = None) -> dict:
    return {"users": users, "ndcg@10": ndcg, "hr@10": ndcg if hr is None else hr}


def kept(tmp_path: Path, rounds: list[dict[str, dict]], choose) -> int:  # noqa: ANN001
    """The round a selection keeps when ``choose(answers, start)`` scores each round of
    ``rounds`` (round 0 first: the start's answers)."""
    selection = RoundSelection(tmp_path / f"best-{len(list(tmp_path.iterdir()))}.safetensors", 0)
    start = rounds[0]
    for server_round, answers in enumerate(rounds):
        valid = choose(answers, start if server_round else {})
        selection.observe(server_round, valid, {"w": torch.zeros(1)}, [])
    return selection.best_round


def by_robust(answers: dict, start: dict) -> dict:
    return round_validation(None, None, None, answers, start)


def by_mean(answers: dict, start: dict) -> dict:
    return validation_mean(answers)


def test_the_weighted_median() -> None:
    assert weighted_median([0.3], [5]) == 0.3  # one node: its value
    assert weighted_median([0.1, 0.3], [5, 5]) == pytest.approx(0.2)  # two equal: their mean
    assert weighted_median([0.1, 0.3], [4, 6]) == 0.3  # more than half the weight decides
    assert weighted_median([0.5, 0.1, 0.2], [1, 1, 1]) == 0.2  # in any order
    assert weighted_median([0.0, 0.1, 0.2, 9.0], [1, 1, 1, 2.9]) == 0.2
    # exactly half the weight on either side: half-way between the two halves
    assert weighted_median([-0.02, -0.02, 0.9, 0.9], [1, 1, 1, 1]) == pytest.approx(0.44)


def test_the_mean_of_answers_of_fractional_weight_is_a_mean() -> None:
    """Weights held to a cap are fractional (1.5 x the median, declared x valid-fraction): the
    mean divides by their sum, not by their whole parts (before: 1.5 and 1.5 summed as 2,
    so two answers of 1.0 meant 1.5, and one of weight 0.5 none at all)."""
    assert validation_mean({"a": answer(1.5, 1.0), "b": answer(1.5, 1.0)})["ndcg@10"] == 1.0
    assert validation_mean({"a": answer(0.5, 0.2)}) == pytest.approx(answer(0, 0.2))


def test_fewer_than_half_the_weight_cannot_move_the_gain_beyond_the_honest_ones() -> None:
    """Whatever liars holding less than half the weight answer, for the start and the round,
    the round's gain over the start lies within the honest nodes' gains."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        honest = rng.integers(2, 6)
        weights = rng.uniform(10, 100, size=honest + 2)
        weights[honest:] *= 0.49 * weights[:honest].sum() / weights[honest:].sum()
        start = {f"n{i}": answer(w, rng.uniform(0, 0.3)) for i, w in enumerate(weights)}
        answers = {n: answer(a["users"], rng.uniform(0, 0.3)) for n, a in start.items()}
        for liar in (f"n{honest}", f"n{honest + 1}"):
            start[liar]["ndcg@10"] = rng.choice([0.0, 1.0])
            answers[liar]["ndcg@10"] = rng.choice([0.0, 1.0])
        gains = [answers[f"n{i}"]["ndcg@10"] - start[f"n{i}"]["ndcg@10"] for i in range(honest)]
        gain = by_robust(answers, start)["ndcg@10"] - validation_mean(start)["ndcg@10"]
        assert min(gains) - 1e-12 <= gain <= max(gains) + 1e-12


@pytest.mark.parametrize("nodes", [1, 2, 5])
def test_where_the_nodes_rank_the_rounds_alike_the_round_kept_is_the_means(
    tmp_path: Path, nodes: int
) -> None:
    """Nodes of different sizes and levels whose gains over the start rank the rounds alike
    (each node's gain a positive multiple of one curve, which may fall below the start): the
    median keeps the round the mean keeps, the start included."""
    rng = np.random.default_rng(nodes)
    for curve in ([0.0, 0.01, 0.03, 0.02], [0.0, -0.01, -0.02, -0.005], [0.0, 0.02, 0.01, 0.04]):
        sizes, levels = rng.uniform(10, 200, nodes), rng.uniform(0.05, 0.3, nodes)
        scales = rng.uniform(0.5, 2.0, nodes)
        rounds = [
            {f"n{i}": answer(sizes[i], levels[i] + scales[i] * gain) for i in range(nodes)}
            for gain in curve
        ]
        expected = int(np.argmax(curve))
        assert kept(tmp_path, rounds, by_mean) == expected
        assert kept(tmp_path, rounds, by_robust) == expected


def test_a_liar_at_the_cap_chooses_under_the_mean_but_not_the_median(tmp_path: Path) -> None:
    """Four honest nodes (50 validation customers each) gain 0.02 in round 1 and lose 0.03 in
    round 2; a liar claiming 10^9 customers (held to row-clip 1.5 x 50 = 75, its answers
    parsed and bounded as the server does) answers 1.0 for round 2: the mean keeps round 2,
    the median of the gains round 1."""
    strategy = FedRecStrategy(RunConfig(row_clip=1.5))

    def replies(honest: float, liar: float) -> dict:
        metrics = {"valid-customers": 50, "valid-hr@10": honest, "valid-ndcg@10": honest}
        lying = {"valid-customers": 1e9, "valid-hr@10": liar, "valid-ndcg@10": liar}
        sent = [node_reply("h" * (i + 1), None, metrics=metrics) for i in range(4)]
        return strategy.validation(1, [*sent, node_reply("liar", None, metrics=lying)])

    rounds = [replies(0.10, 0.10), replies(0.12, 0.0), replies(0.07, 1.0)]
    assert rounds[2]["liar"]["users"] == 75
    assert kept(tmp_path, rounds, by_mean) == 2
    assert kept(tmp_path, rounds, by_robust) == 1
    assert by_robust(rounds[1], rounds[0])["ndcg@10"] == pytest.approx(
        validation_mean(rounds[0])["ndcg@10"] + 0.02
    )


def test_nodes_without_an_answer_for_the_start_are_left_out_of_the_comparison() -> None:
    start = {"a": answer(10, 0.1), "b": answer(10, 0.2)}
    answers = {"a": answer(10, 0.15), "c": answer(1000, 1.0)}  # c never answered the start
    assert by_robust(answers, start) == pytest.approx(answer(10, 0.15 + 0.05))
    assert by_robust({"c": answer(10, 1.0)}, start) is None  # nobody to compare
    # a run whose start no node answered (a checkpoint from before): the mean, as before
    assert robust_validation(answers, {}) == validation_mean(answers)


def merchants(fraction: float, names: list[str]) -> FedRecStrategy:
    """A deployment's strategy (``row-clip`` 1.5) whose registry declares 1,000 customers for
    each of ``names`` (Flower node ids 1, 2, ...), of which ``fraction`` validate."""
    strategy = FedRecStrategy(RunConfig(row_clip=1.5))
    strategy.registry = Registry(
        {i + 1: RegisteredNode(name, None, 1000) for i, name in enumerate(names)}
    )
    strategy.valid_fraction = fraction
    return strategy


def validation_replies(answers: dict[str, tuple[float, float]]) -> list:
    """Each node's reply (Flower node ids 1, 2, ... in order) answering (customers, NDCG@10 and
    HR@10) for its validation customers."""
    return [
        node_reply(name, None, node_id=i + 1, metrics=validating(customers, value))
        for i, (name, (customers, value)) in enumerate(answers.items())
    ]


def validating(customers: float, value: float) -> dict:
    """A validation answer as a node's metrics carry it."""
    return {"valid-customers": customers, "valid-hr@10": value, "valid-ndcg@10": value}


def test_a_liar_claiming_its_registered_customers_weighs_an_honest_nodes_answer() -> None:
    """Five merchants of 1,000 registered customers, a tenth of which validate: an honest
    node answers for about 100. Two liars answer 1.0 for the round and claim their 1,000. Held
    only to the registered figure and 1.5 x the median (150), they held 300 of 600, half the
    weight, and moved the round's gain half-way to theirs (+0.44, every honest node lost 0.02):
    two of five nodes chose the round. Each answer is now held to what the server expects of
    its node, its registered customers x valid-fraction: 100, as an honest node of its size."""
    names = ["h0", "h1", "h2", "l1", "l2"]
    strategy = merchants(0.1, names)
    start = strategy.validation(0, validation_replies(dict.fromkeys(names, (100, 0.1))))
    lying = {"l1": (1000, 1.0), "l2": (1000, 1.0)}
    answers = strategy.validation(
        1, validation_replies({n: (100, 0.08) for n in names[:3]} | lying)
    )
    assert answers["l1"]["users"] == answers["h0"]["users"] == 100
    gain = by_robust(answers, start)["ndcg@10"] - validation_mean(start)["ndcg@10"]
    assert gain == pytest.approx(-0.02)


def test_a_reply_naming_another_node_leaves_out_both_answers_without_a_registry() -> None:
    """Without a registry a node is known by the name its report gives: a reply naming
    another node (b) replaced b's answer (one liar of three moved the gain to +0.90); every
    answer of a name given by more than one reply in a round is now left out."""
    strategy = FedRecStrategy(RunConfig(row_clip=1.5))
    start = strategy.validation(0, validation_replies(dict.fromkeys("abc", (100, 0.1))))
    sent = validation_replies({"a": (100, 0.08), "b": (100, 0.08), "c": (150, 1.0)})
    sent[2].content["privacy"]["node"] = "b"  # c speaks as b
    answers = strategy.validation(1, sent)
    assert list(answers) == ["a"]
    assert by_robust(answers, start)["ndcg@10"] == pytest.approx(0.1 - 0.02)
