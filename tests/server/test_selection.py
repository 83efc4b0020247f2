"""Choosing a federation's rounds (server/federation/selection.py), the nodes' validation
answers that choose them in a deployment (FedRecStrategy.aggregate_evaluate), and the popularity
prior validation adds on the nodes' counts (server/federation/popularity.py)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_DEVICE, TINY_SETTINGS, node_reply, popularity_only_dataset

from server.federation.aggregation import NodeUpdate
from server.federation.popularity import NodeCounts, add_prior
from server.federation.registry import RegisteredNode, Registry
from server.federation.selection import RoundSelection, round_validation
from server.federation.strategy import FedRecStrategy
from shared.recommender.experiment import Experiment
from shared.recommender.metrics import evaluate
from shared.recommender.popularity import history_counts
from shared.runs.config import RunConfig
from simulations.baselines import popularity


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_the_best_round_is_kept_and_a_stale_run_stops(tmp_path: Path) -> None:
    selection = RoundSelection(tmp_path / "best.safetensors", patience=2)
    assert selection.best_state() is None
    assert selection.observe(1, {"ndcg@10": 0.05}, weights(1.0), [0, 1])
    assert selection.observe(2, {"ndcg@10": 0.07}, weights(2.0), [0, 1, 2])
    assert not selection.observe(3, {"ndcg@10": 0.06}, weights(3.0), [0, 1, 2, 3])
    assert not selection.stale(3)  # one round without a better one
    assert not selection.observe(4, {"ndcg@10": 0.07}, weights(4.0), [0, 1, 2, 3])  # a tie
    assert selection.stale(4)
    state, rows = selection.best_state()
    assert torch.equal(state["w"], weights(2.0)["w"]) and rows == [0, 1, 2]
    assert not RoundSelection(tmp_path / "other.safetensors", patience=0).stale(100)


def test_a_resumed_run_takes_up_the_best_round_it_had_completed(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    RoundSelection(path, patience=2).observe(3, {"ndcg@10": 0.07}, weights(3.0), [1])
    resumed = RoundSelection(path, patience=2)
    resumed.resume(done=3, history=[{"round": 3, "selection": {"ndcg@10": 0.07}}])
    assert (resumed.best_round, resumed.best_score) == (3, 0.07)
    assert not resumed.stale(4) and resumed.stale(5)
    # a best saved for a round the checkpoint does not hold (a crash between the two) is
    # not taken up: that round is trained again
    earlier = RoundSelection(path, patience=2)
    earlier.resume(done=2, history=[])
    assert earlier.best_round == 0 and earlier.best_score == float("-inf")


def test_the_start_is_shipped_when_no_round_beats_it(tmp_path: Path) -> None:
    """Round 0, the public starting model, is a candidate: a federation whose rounds all
    validate below it keeps it. It does not shorten the run: patience counts trained rounds."""
    selection = RoundSelection(tmp_path / "best.safetensors", patience=2)
    assert selection.observe(0, {"ndcg@10": 0.08}, weights(0.0), [])
    assert not selection.observe(1, {"ndcg@10": 0.05}, weights(1.0), [0])
    assert not selection.stale(1)  # as without the start: round 1 is the best trained one
    assert not selection.observe(2, {"ndcg@10": 0.06}, weights(2.0), [0, 1])
    assert not selection.stale(3)  # round 2 beat round 1
    assert not selection.observe(3, {"ndcg@10": 0.05}, weights(3.0), [0])
    assert selection.stale(4)
    state, rows = selection.best_state()
    assert selection.best_round == 0 and torch.equal(state["w"], weights(0.0)["w"]) and rows == []
    # resumed after round 3: the start stays the best, the patience counts from round 2
    resumed = RoundSelection(tmp_path / "best.safetensors", patience=2)
    history = [
        {"round": r, "selection": {"ndcg@10": v}} for r, v in ((1, 0.05), (2, 0.06), (3, 0.05))
    ]
    resumed.resume(done=3, history=history)
    assert (resumed.best_round, resumed.last_gain) == (0, 2) and resumed.stale(4)


def evaluation_reply(node: str, metrics: dict):
    return node_reply(node, None, metrics=metrics)


def test_the_nodes_validation_answers_are_weighted_by_their_customers() -> None:
    strategy = FedRecStrategy(RunConfig(row_clip=0))  # the weight bound off: its own tests
    replies = [
        evaluation_reply(
            "a",
            {
                "customers": 100,
                "hr@10": 0.2,
                "ndcg@10": 0.1,
                "valid-customers": 30,
                "valid-hr@10": 0.3,
                "valid-ndcg@10": 0.2,
            },
        ),
        evaluation_reply(
            "b",
            {
                "customers": 100,
                "hr@10": 0.1,
                "ndcg@10": 0.05,
                "valid-customers": 10,
                "valid-hr@10": 0.1,
                "valid-ndcg@10": 0.0,
            },
        ),
        # out of range: left out of the validation (its test figures still count)
        evaluation_reply(
            "c",
            {
                "customers": 100,
                "hr@10": 0.1,
                "ndcg@10": 0.05,
                "valid-customers": 10,
                "valid-hr@10": 7.0,
                "valid-ndcg@10": 0.0,
            },
        ),
    ]
    result = strategy.aggregate_evaluate(1, replies)
    assert result["customers"] == 300
    assert result["valid"]["users"] == 40
    assert result["valid"]["ndcg@10"] == pytest.approx((30 * 0.2 + 10 * 0.0) / 40)
    assert result["valid"]["hr@10"] == pytest.approx((30 * 0.3 + 10 * 0.1) / 40)
    plain = evaluation_reply("d", {"customers": 5, "hr@10": 0.0, "ndcg@10": 0.0})
    assert "valid" not in strategy.aggregate_evaluate(1, [plain])  # no node validated


def test_a_registered_node_speaks_for_no_more_customers_than_it_declared() -> None:
    """A node claiming a billion validation customers cannot choose the round alone: its
    weight is capped at its registered figure (and its test figures' weight too)."""
    strategy = FedRecStrategy(RunConfig(row_clip=0))  # the registry's cap alone
    strategy.registry = Registry(
        {7: RegisteredNode("liar", None, 10), 8: RegisteredNode("honest", None, 30)}
    )
    claims = {"customers": 1e9, "hr@10": 1.0, "ndcg@10": 1.0}
    liar = node_reply(
        "liar",
        None,
        node_id=7,
        metrics={**claims, "valid-customers": 1e9, "valid-hr@10": 1.0, "valid-ndcg@10": 1.0},
    )
    honest = node_reply(
        "honest",
        None,
        node_id=8,
        metrics={
            **{"customers": 30, "hr@10": 0.0, "ndcg@10": 0.0},
            **{"valid-customers": 30, "valid-hr@10": 0.0, "valid-ndcg@10": 0.0},
        },
    )
    result = strategy.aggregate_evaluate(1, [liar, honest])
    assert result["customers"] == 40 and result["ndcg@10"] == pytest.approx(10 / 40)
    assert result["valid"]["users"] == 40
    assert result["valid"]["ndcg@10"] == pytest.approx(10 / 40)


def test_the_nodes_counts_sum_and_survive_a_checkpoint() -> None:
    """The popularity prior's counts (server/federation/popularity.py): each node's latest
    accepted counts, summed once per node however many rounds sent them, and kept through the
    checkpoint's JSON as a resumed run finds them."""
    counts = NodeCounts(4)

    def update(node: str, held: list[int] | None) -> NodeUpdate:
        return NodeUpdate(node, 1.0, {}, counts=None if held is None else np.array(held))

    counts.record([update("a", [1, 0, 2, 0]), update("b", [0, 0, 1, 3])])
    counts.record([update("a", [1, 0, 2, 0]), update("c", None)])  # a again; c sent none
    assert counts.total().tolist() == [1, 0, 3, 3]
    resumed = NodeCounts(4, json.loads(json.dumps(counts.stored())))
    assert resumed.total().tolist() == [1, 0, 3, 3] and sorted(resumed.by_node) == ["a", "b"]
    assert NodeCounts(4).total().tolist() == [0, 0, 0, 0]


def test_where_popularity_is_all_there_is_the_federations_model_matches_it(tmp_path: Path) -> None:
    """Issue 16: a federation's server held no counts, and where popularity is the signal its
    rounds stayed far below it (dense random ratings: 0.08 against 0.29 on test). Now the
    nodes' summed counts and the validation that chose the round give the kept model (here the
    public start, which knows nothing of popularity) the prior: it validates as popularity."""
    data = popularity_only_dataset(tmp_path / "data")
    experiment = Experiment.prepare(data, RunConfig(**TINY_SETTINGS, device=TEST_DEVICE), False)
    model, histories = experiment.new_model(), experiment.train_histories()
    items = experiment.dataset.num_items
    counts = NodeCounts(items)
    for node, held in (("a", histories[:90]), ("b", histories[90:])):  # two nodes' customers
        counts.record([NodeUpdate(node, 1.0, {}, counts=history_counts(held, items))])
    validating = experiment.split.validation_users(1.0)
    validate = partial(round_validation, experiment, validating=validating)
    start = validate(model)
    valid, prior = add_prior(model, counts, validate, start)
    popular = popularity(histories, items)
    baseline, _ = evaluate(popular, experiment.split, "valid", users=validating)
    assert prior["nodes"] == 2 and prior["weight"] > 0
    assert valid["ndcg@10"] >= baseline["ndcg@10"] - 0.01 > start["ndcg@10"] + 0.05
    assert valid == validate(model)  # the model now carries the prior
