"""Aggregation (server/federation/aggregation.py), the wire format (shared/federation/wire.py) and
the strategy's validation of node replies (server/federation/strategy.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import node_reply

from server.federation.aggregation import (
    NodeUpdate,
    ServerOptimizer,
    aggregate,
    clip_updates,
    weight_bound,
)
from server.federation.strategy import FedRecStrategy
from shared.federation.wire import ITEM_TABLES, decode, encode, trainable_state
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.runs.config import RunConfig

ITEMS = 6


def global_state() -> dict[str, torch.Tensor]:
    """The three item tables (zeros) and one dense weight (ones)."""
    return {
        "id_in.weight": torch.zeros(ITEMS + 1, 2),  # row 0 is padding
        "id_scores.weight": torch.zeros(ITEMS, 2),
        "id_scores.bias": torch.zeros(ITEMS),
        "norm.weight": torch.ones(3),
    }


def sparse_update(
    node: str, weight: float, rows: list[int], value: float, dense: float
) -> NodeUpdate:
    """A node that sends the item rows ``rows`` (all set to ``value``) and a dense weight."""
    index = np.array(rows, dtype=np.int64)
    arrays = {
        "id_in.weight": torch.full((len(rows), 2), value),
        "id_scores.weight": torch.full((len(rows), 2), value),
        "id_scores.bias": torch.full((len(rows),), value),
        "norm.weight": torch.full((3,), dense),
    }
    return NodeUpdate(node, weight, arrays, dict.fromkeys(ITEM_TABLES, index))


def dense_update(node: str, weight: float, value: float) -> NodeUpdate:
    return NodeUpdate(
        node, weight, {k: torch.full_like(v, value) for k, v in global_state().items()}
    )


def apply_mean(updates: list[NodeUpdate], method: str = "mean") -> dict[str, torch.Tensor]:
    state = global_state()
    return ServerOptimizer("sgd", 1.0).step(state, aggregate(state, updates, method))


# --- what one node can move (row-clip) ------------------------------------------------------


def test_the_row_bound_holds_a_boosted_node_to_the_others_scale() -> None:
    honest = [
        sparse_update(f"h{i}", 10.0, [0, 1, 2], value=0.1 * (1 + i / 10), dense=1.1)
        for i in range(4)
    ]
    boosted = sparse_update("evil", 10.0, [0, 1, 2], value=100.0, dense=1000.0)
    unbounded = apply_mean([*honest, sparse_update("evil", 10.0, [0, 1, 2], 100.0, 1000.0)])
    updates = [*honest, boosted]
    clipped = clip_updates(global_state(), updates, 3.0)
    assert set(clipped) == {"evil"}  # three tables x three rows, and the dense weight
    assert clipped["evil"] == 3 * 3 + 1
    new = apply_mean(updates)
    median_row = 0.1 * (1 + 2 / 10)  # the rows' median over the five nodes (h2's value)
    assert torch.all(boosted.arrays["id_scores.bias"] <= 3 * median_row + 1e-6)
    assert float(new["id_scores.bias"][0]) < 0.2 * 1.1 + 3 * median_row / 5
    assert float(unbounded["id_scores.bias"][0]) > 19  # without the bound, one node decides
    # the dense weight: one node of five moves it by at most three times the median node
    median_dense = torch.full((3,), 0.1).norm()
    assert float((boosted.arrays["norm.weight"] - 1).norm()) <= 3 * float(median_dense) + 1e-5
    assert float(new["norm.weight"].max()) < 1.2
    # the honest nodes' updates are untouched
    torch.testing.assert_close(honest[0].arrays["id_scores.bias"], torch.full((3,), 0.1))


def test_a_row_only_one_node_sends_is_held_to_the_tables_scale() -> None:
    """One node cannot set a product's bias alone: with fewer than three senders, a row is
    bounded by the median movement of all the table's rows this round."""
    others = [sparse_update(f"h{i}", 10.0, [0, 1], value=0.2, dense=1.0) for i in range(3)]
    alone = sparse_update("evil", 1.0, [0, 5], value=50.0, dense=1.0)
    clipped = clip_updates(global_state(), [*others, alone], 3.0)
    assert clipped == {"evil": 6}  # rows 0 (per-row median) and 5 (table median), 3 tables
    new = apply_mean([*others, alone])
    torch.testing.assert_close(new["id_scores.bias"][5], torch.tensor(0.6))  # 3 x 0.2, not 50
    torch.testing.assert_close(new["id_in.weight"][6], torch.full((2,), 0.6))  # row norm 3 x 0.2√2


def test_a_node_cannot_shrink_the_tables_scale_by_sending_every_row_unmoved() -> None:
    """The table's scale counts each node once: a node that sends all rows with no movement
    does not freeze the rows the others sell alone."""
    merchants = [sparse_update(f"m{i}", 10.0, [i], value=0.2, dense=1.0) for i in range(3)]
    frozen = sparse_update("evil", 10.0, list(range(ITEMS)), value=0.0, dense=1.0)
    assert clip_updates(global_state(), [*merchants, frozen], 3.0) == {}
    torch.testing.assert_close(merchants[0].arrays["id_scores.bias"], torch.tensor([0.2]))


def test_a_round_where_no_node_moved_a_product_is_aggregated() -> None:
    """Nodes whose customers have nothing left to learn from (every customer's last events held
    out for evaluation: 3 events each) send no item rows: the row bound crashed the run
    (torch.stack of no tables' medians); now such a round aggregates the rest."""
    updates = [sparse_update(f"n{i}", 1.0, [], value=0.0, dense=1.0 + i) for i in range(3)]
    assert clip_updates(global_state(), updates, 3.0) == {}
    new = apply_mean(updates)
    torch.testing.assert_close(new["id_scores.bias"], torch.zeros(ITEMS))
    torch.testing.assert_close(new["norm.weight"], torch.full((3,), 2.0))


def test_the_row_bound_can_be_turned_off() -> None:
    updates = [sparse_update("a", 1.0, [0], 0.1, 1.0), sparse_update("b", 1.0, [0], 90.0, 1.0)]
    assert clip_updates(global_state(), updates, 0.0) == {}
    assert float(updates[1].arrays["id_scores.bias"][0]) == 90.0


# --- the row-aware weighted mean -------------------------------------------------------------


def test_weighted_mean_is_row_aware() -> None:
    a = sparse_update("a", 1.0, [0, 1], value=1.0, dense=2.0)
    b = sparse_update("b", 3.0, [1, 2], value=5.0, dense=4.0)
    new = apply_mean([a, b])
    expected_rows = torch.tensor(
        [
            1.0,  # row 0: only a sent it -> a's value, not diluted by b
            (1 * 1.0 + 3 * 5.0) / 4,  # row 1: both, weighted by node size
            5.0,  # row 2: only b
            0.0,  # rows 3 to 5: nobody sent them, they keep the global value
            0.0,
            0.0,
        ]
    )
    torch.testing.assert_close(new["id_scores.bias"], expected_rows)
    torch.testing.assert_close(new["id_scores.weight"], expected_rows[:, None].expand(ITEMS, 2))
    # id_in has the padding row first: item i is row i + 1, and the padding row is untouched
    torch.testing.assert_close(new["id_in.weight"][1:], expected_rows[:, None].expand(ITEMS, 2))
    assert torch.all(new["id_in.weight"][0] == 0)
    # dense weights: every node sent them, weighted by node size
    torch.testing.assert_close(new["norm.weight"], torch.full((3,), (1 * 2.0 + 3 * 4.0) / 4))


def test_the_mean_never_holds_every_nodes_delta_at_once(monkeypatch) -> None:
    """The weighted mean is accumulated node by node (the driver's memory stays one model's,
    at 100 nodes too) and equals the mean over the stacked deltas."""
    from server.federation import aggregation

    generator = np.random.default_rng(0)
    updates = [
        sparse_update(
            f"n{k}",
            float(generator.integers(1, 50)),
            sorted(generator.choice(ITEMS, size=int(generator.integers(1, ITEMS)), replace=False)),
            float(generator.normal()),
            float(generator.normal()),
        )
        for k in range(8)
    ]
    state = global_state()
    expected = {}
    for name, reference in state.items():  # the mean over the stacked deltas, row by row
        deltas, present = aggregation._stack(name, reference, updates)
        weights = torch.tensor([u.weight for u in updates]).view(-1, 1) * present
        weights = weights / weights.sum(0, keepdim=True).clamp(min=1e-12)
        expected[name] = (weights.view(*weights.shape, *[1] * (deltas.ndim - 2)) * deltas).sum(0)

    def no_stack(*_):
        raise AssertionError("the mean stacked every node's delta")

    monkeypatch.setattr(aggregation, "_stack", no_stack)
    for name, value in aggregate(state, updates, "mean").items():
        torch.testing.assert_close(value, expected[name])


def test_rows_nobody_sent_keep_a_non_zero_global_value() -> None:
    state = global_state()
    state["id_scores.bias"] = torch.arange(ITEMS, dtype=torch.float32)
    update = NodeUpdate(
        "a",
        5.0,
        {**{k: v.clone() for k, v in state.items()}, "id_scores.bias": torch.tensor([10.0])},
        {"id_scores.bias": np.array([4])},
    )
    delta = aggregate(state, [update])
    assert delta["id_scores.bias"].tolist() == [0, 0, 0, 0, 6, 0]
    assert all(torch.all(delta[k] == 0) for k in state if k != "id_scores.bias")


def test_empty_row_update_changes_no_row() -> None:
    new = apply_mean(
        [
            sparse_update("a", 1.0, [], value=9.0, dense=1.0),
            sparse_update("b", 1.0, [3], value=2.0, dense=1.0),
        ]
    )
    assert new["id_scores.bias"].tolist() == [0, 0, 0, 2, 0, 0]


# --- robust aggregation ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["median", "trimmed"])
def test_robust_methods_resist_one_absurd_node(method: str) -> None:
    honest = [0.9, 1.0, 1.05, 1.1]
    updates = [dense_update(str(i), 1.0, v) for i, v in enumerate(honest)]
    updates.append(dense_update("evil", 1.0, 1e6))
    state = global_state()
    mean = aggregate(state, updates, "mean")
    robust = aggregate(state, updates, method, trim=0.2)
    assert mean["norm.weight"].max() > 1e4  # the plain mean is dragged away
    for name, delta in robust.items():
        value = state[name] + delta
        assert value.min() >= 0.9 - 1e-6 and value.max() <= 1.1 + 1e-6, (name, value)
    if method == "trimmed":  # drops the lowest and the highest of five, averages the rest
        torch.testing.assert_close(
            state["norm.weight"] + robust["norm.weight"], torch.full((3,), (1.0 + 1.05 + 1.1) / 3)
        )


@pytest.mark.parametrize("method", ["median", "trimmed"])
def test_robust_methods_are_row_aware(method: str) -> None:
    """Rows are aggregated over the nodes that sent them: absent nodes are not zeros."""
    updates = [
        sparse_update("a", 1.0, [0, 1], value=2.0, dense=1.0),
        sparse_update("b", 1.0, [0, 1], value=2.0, dense=1.0),
        sparse_update("c", 1.0, [1], value=2.0, dense=1.0),
        sparse_update("d", 1.0, [1], value=2.0, dense=1.0),
        sparse_update("e", 1.0, [1], value=1e6, dense=1.0),
    ]
    new = apply_mean(updates, method)
    bias = new["id_scores.bias"]
    assert bias[0] == pytest.approx(2.0)  # two of five sent it: the three others are not zeros
    assert bias[1] == pytest.approx(2.0)  # median of 2, 2, 2, 2, 1e6; trimmed drops both ends
    assert torch.all(bias[2:] == 0)
    assert torch.all(new["id_in.weight"][0] == 0)


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(global_state(), [dense_update("a", 1.0, 1.0)], "mode")


# --- server optimisers ----------------------------------------------------------------------


def test_sgd_with_lr_one_is_weighted_averaging() -> None:
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in global_state().items()}
    nodes = [
        {k: torch.randn(v.shape, generator=generator) for k, v in state.items()} for _ in range(3)
    ]
    weights = [10.0, 30.0, 60.0]
    updates = [
        NodeUpdate(str(i), w, n) for i, (w, n) in enumerate(zip(weights, nodes, strict=True))
    ]
    new = ServerOptimizer("sgd", 1.0).step(state, aggregate(state, updates))
    for name in state:
        average = sum(w * n[name] for w, n in zip(weights, nodes, strict=True)) / sum(weights)
        torch.testing.assert_close(new[name], average)
    half = ServerOptimizer("sgd", 0.5).step(state, aggregate(state, updates))
    for name in state:
        torch.testing.assert_close(half[name], (state[name] + new[name]) / 2)


def test_fedadam_moves_in_the_direction_of_the_delta() -> None:
    state = global_state()
    delta = {k: torch.zeros_like(v) for k, v in state.items()}
    delta["id_scores.bias"] = torch.tensor([0.5, -0.2, 0.0, 3.0, -1e-2, 0.0])
    delta["norm.weight"] = torch.tensor([1.0, -1.0, 0.0])
    optimizer = ServerOptimizer("adam", lr=0.01)
    new = optimizer.step(state, delta)
    for name in state:
        moved = new[name] - state[name]
        assert torch.equal(torch.sign(moved), torch.sign(delta[name])), name
        assert moved.abs().max() <= 0.01 + 1e-6  # Adam's step is bounded by the learning rate
    assert optimizer.state  # moments kept for the next round
    again = optimizer.step(new, delta)
    assert torch.all(
        torch.sign(again["norm.weight"] - new["norm.weight"]) == torch.sign(delta["norm.weight"])
    )


# --- the wire format ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = ModelConfig(num_items=ITEMS, text_dim=8, dim=4, max_len=5, layers=1, heads=2)
    model = FusionRecommender(config, torch.nn.functional.normalize(torch.randn(ITEMS, 8), dim=1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return trainable_state(model)


def test_wire_round_trip_dense(model_state) -> None:
    arrays = encode(model_state)
    assert set(arrays) == set(model_state)
    tensors, rows = decode(arrays, model_state)
    assert rows == {}
    for name, value in model_state.items():
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], value), name


def test_wire_round_trip_row_sparse_float16(model_state) -> None:
    rows = dict.fromkeys(ITEM_TABLES, np.array([4, 1]))
    arrays = encode(model_state, rows, dtype="float16")
    for name in ITEM_TABLES:
        assert arrays[name].shape[0] == 2 and arrays[name + "@rows"].tolist() == [4, 1]
    assert all(a.dtype == np.float16 for k, a in arrays.items() if not k.endswith("@rows"))
    tensors, got_rows = decode(arrays, model_state)
    assert {k: v.tolist() for k, v in got_rows.items()} == dict.fromkeys(ITEM_TABLES, [4, 1])
    for name, value in model_state.items():
        if name in ITEM_TABLES:
            value = value[torch.tensor([4, 1]) + ITEM_TABLES[name]]
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], value.half().float()), name
        torch.testing.assert_close(tensors[name], value, rtol=1e-3, atol=1e-3)


def bad(arrays: dict, name: str, value) -> dict:
    return {**arrays, name: value}


@pytest.mark.parametrize(
    "case",
    [
        "shape",
        "int dtype",
        "bool dtype",
        "nan",
        "inf",
        "row out of range",
        "negative row",
        "duplicate rows",
        "float rows",
        "rows and values disagree",
    ],
)
def test_decode_rejects_a_bad_array_naming_it(model_state, case: str) -> None:
    arrays = encode(model_state, dict.fromkeys(ITEM_TABLES, np.array([0, 2])))
    name = {
        "shape": "position.weight",
        "int dtype": "norm.weight",
        "bool dtype": "norm.bias",
        "nan": "residual.weight",
        "inf": "id_in.weight",
    }.get(case, "id_scores.weight")
    value = arrays[name]
    arrays = {
        "shape": lambda: bad(arrays, name, value[:-1]),
        "int dtype": lambda: bad(arrays, name, value.astype(np.int64)),
        "bool dtype": lambda: bad(arrays, name, value > 0),
        "nan": lambda: bad(
            arrays,
            name,
            np.where(np.arange(value.size).reshape(value.shape) == 3, np.nan, value).astype(
                np.float32
            ),
        ),
        "inf": lambda: bad(arrays, name, np.full_like(value, np.inf)),
        "row out of range": lambda: bad(arrays, name + "@rows", np.array([0, ITEMS])),
        "negative row": lambda: bad(arrays, name + "@rows", np.array([-1, 2])),
        "duplicate rows": lambda: bad(arrays, name + "@rows", np.array([2, 2])),
        "float rows": lambda: bad(arrays, name + "@rows", np.array([0.0, 2.0])),
        "rows and values disagree": lambda: bad(arrays, name + "@rows", np.array([0, 1, 2])),
    }[case]()
    with pytest.raises(ValueError, match=re.escape(name)):
        decode(arrays, model_state)


def test_decode_accepts_the_last_item_row(model_state) -> None:
    last = np.array([ITEMS - 1])
    tensors, rows = decode(encode(model_state, dict.fromkeys(ITEM_TABLES, last)), model_state)
    assert all(rows[name].tolist() == [ITEMS - 1] for name in ITEM_TABLES)
    assert torch.equal(tensors["id_in.weight"][0], model_state["id_in.weight"][ITEMS])


def test_decode_rejects_missing_and_extra_arrays(model_state) -> None:
    arrays = encode(model_state)
    missing = {k: v for k, v in arrays.items() if k != "blocks.0.qkv.weight"}
    with pytest.raises(ValueError, match=re.escape("blocks.0.qkv.weight")):
        decode(missing, model_state)
    with pytest.raises(ValueError, match="backdoor"):
        decode({**arrays, "backdoor": np.zeros(3, np.float32)}, model_state)


def test_decode_rejects_rows_for_a_dense_array(model_state) -> None:
    arrays = encode(model_state)
    arrays["position.weight"] = arrays["position.weight"][:1]
    arrays["position.weight@rows"] = np.array([0])
    with pytest.raises(ValueError, match=re.escape("position.weight")):
        decode(arrays, model_state)


def test_decode_rejects_rows_of_an_unknown_array(model_state) -> None:
    with pytest.raises(ValueError, match="backdoor"):
        decode({**encode(model_state), "backdoor@rows": np.array([0])}, model_state)


# --- the strategy validates every reply -----------------------------------------------------


def shifted(
    state: dict[str, torch.Tensor], amount: float, rows=None, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    return encode({k: v + amount for k, v in state.items()}, rows, dtype)


def test_node_updates_reject_an_absurd_norm_and_keep_the_others(model_state) -> None:
    strategy = FedRecStrategy(RunConfig())
    rows = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    replies = [
        node_reply("good-dense", shifted(model_state, 0.01), 30),
        node_reply("absurd", shifted(model_state, 1e5), 50),
        node_reply("good-sparse", shifted(model_state, -0.01, rows, "float16"), 10),
        node_reply(
            "nan", {**shifted(model_state, 0.0), "norm.weight": np.full(4, np.nan, np.float32)}, 5
        ),
        node_reply("declined", None, 0, declined=True),
    ]
    updates, rejected = strategy.node_updates(replies, model_state)
    assert [u.node for u in updates] == ["good-dense", "good-sparse"]
    assert [u.weight for u in updates] == [15.0, 10.0]  # row-clip (1.5) x the lower median, 10
    assert {k: v.tolist() for k, v in updates[1].rows.items()} == dict.fromkeys(ITEM_TABLES, [1, 3])
    assert len(rejected) == 2
    assert rejected[0].startswith("absurd:") and "norm" in rejected[0]
    assert rejected[1].startswith("nan:") and "norm.weight" in rejected[1]
    # the accepted updates aggregate into a new global model that moved by their deltas
    new, clipped = strategy.apply(model_state, updates)
    assert clipped == {}  # updates of one size: the row bound leaves them alone
    assert torch.all(torch.isfinite(new["position.weight"]))
    torch.testing.assert_close(
        new["position.weight"] - model_state["position.weight"],
        torch.full_like(model_state["position.weight"], (15 * 0.01 - 10 * 0.01) / 25),
        rtol=0,
        atol=1e-3,
    )  # the second node sent float16


def test_node_updates_survive_rows_for_a_dense_array(model_state) -> None:
    strategy = FedRecStrategy(RunConfig())
    crafted = shifted(model_state, 0.0)
    crafted["position.weight"] = crafted["position.weight"][:1]
    crafted["position.weight@rows"] = np.array([0])
    updates, rejected = strategy.node_updates(
        [node_reply("crafted", crafted, 5), node_reply("good", shifted(model_state, 0.01), 5)],
        model_state,
    )
    assert [u.node for u in updates] == ["good"]
    assert len(rejected) == 1 and rejected[0].startswith("crafted:")


def test_weight_bound_ignores_nodes_with_nothing_to_answer() -> None:
    """Two nodes, one with no validation customers: the lower median was 0, every answer was
    cut to 0 customers and the round's evaluation vanished."""
    assert weight_bound([0, 100], 1.5) == 150
    assert weight_bound([0, 0, 40, 100], 2.0) == 80
    assert weight_bound([0, 0], 1.5) == float("inf")
