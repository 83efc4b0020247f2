"""A malicious node against the server (server/federation/strategy.py, server/federation/rounds.py,
server/federation/registry.py, shared/federation/reports.py, shared/federation/wire.py): every
hostile reply is rejected or
survived, never a crash, and no single node can take over the global model."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from helpers import node_reply, release

from server.federation.exchange import RoundResult
from server.federation.registry import RegisteredNode, Registry, RegistryError, write_registry
from server.federation.releases import note_unamplified, privacy_reports, record_privacy
from server.federation.strategy import MAX_CUSTOMERS, FedRecStrategy
from server.privacy.ledger import PrivacyLedger, verify_chain
from server.privacy.ledger_gaps import record_lost_contributions
from server.privacy.node_keys import NodeKeys
from shared.federation.reports import ReportError, parse_report, release_value_problem
from shared.federation.signing import SIGNED_FIELDS, NodeKey, digest_arrays
from shared.federation.wire import COUNTS, ITEM_TABLES, counts_record, encode, trainable_state
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.runs.config import RunConfig

ITEMS = pd.DataFrame({"item_id": [f"p{i}" for i in range(8)], "title": ["t"] * 8})


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = ModelConfig(num_items=8, text_dim=8, dim=8, layers=1, heads=1, max_len=5)
    return trainable_state(FusionRecommender(config, torch.randn(8, 8)))


def moved(state: dict[str, torch.Tensor], amount: float, rows=None) -> dict[str, np.ndarray]:
    return encode({k: v + amount for k, v in state.items()}, rows)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, -1.0, "many"])
def test_a_weight_that_is_not_a_finite_number_is_rejected(state, weight) -> None:
    reply = node_reply("evil", moved(state, 0.01), metrics={"num-examples": 1.0})
    reply.content["metrics"]["num-examples"] = weight if weight != "many" else 1.0
    if weight == "many":
        del reply.content["metrics"]["num-examples"]  # no weight at all
    good = node_reply("good", moved(state, 0.01), 10)
    updates, rejected = FedRecStrategy(RunConfig()).node_updates([reply, good], state)
    assert [u.node for u in updates] == ["good"]
    assert rejected and rejected[0].startswith("evil:") and "num-examples" in rejected[0]


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint8", "uint32", "uint64"])
def test_row_indices_of_any_integer_width_are_handled(state, dtype) -> None:
    rows = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    arrays = moved(state, 0.01, rows)
    for name in ITEM_TABLES:
        arrays[name + "@rows"] = arrays[name + "@rows"].astype(dtype)
    updates, rejected = FedRecStrategy(RunConfig()).node_updates(
        [node_reply("narrow", arrays, 10)], state
    )
    assert rejected == [] and updates[0].rows["id_scores.bias"].dtype == np.int64
    new, _ = FedRecStrategy(RunConfig()).apply(state, updates)  # aggregates without an error
    assert all(torch.isfinite(v).all() for v in new.values())


def test_row_indices_that_wrap_around_are_rejected(state) -> None:
    rows = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    arrays = moved(state, 0.01, rows)
    arrays["id_scores.bias@rows"] = np.array([1, 2**64 - 1], dtype=np.uint64)  # -1 wrapped
    updates, rejected = FedRecStrategy(RunConfig()).node_updates(
        [node_reply("wrap", arrays, 10)], state
    )
    assert updates == [] and "out of range" in rejected[0]


@pytest.mark.parametrize(
    "record, words",
    [
        ({k: v for k, v in release().items() if k != "steps"}, "steps"),
        (release(backdoor=1), "unknown field"),
        (release(epsilon=math.nan), "epsilon"),
        (release(epsilon=-1.0), "epsilon"),
        (release(steps=2.5), "steps"),
        (release(round="1"), "round"),
        (release(purpose="fun"), "purpose"),
        (release(unit="x" * 10_000), "unit"),
        ({"node": 7}, "node"),
    ],
)
def test_a_malformed_privacy_report_is_refused_naming_the_field(record, words) -> None:
    with pytest.raises(ReportError, match=words):
        parse_report(record)


@pytest.mark.parametrize(
    ("change", "words"),
    [({"sample_rate": 0.0}, "sample_rate"), ({"noise_multiplier": 0.0}, "noise_multiplier")],
)
def test_a_release_no_accountant_recomputes_parses_and_is_named(change, words) -> None:
    """A sample rate or a noise of 0 parses (the claim is kept for the ledger) and is named by
    the one definition the server refuses it with on arrival and the audit fails it with."""
    report = parse_report(release(**change))
    assert words in release_value_problem(report.release.as_dict())
    assert release_value_problem(parse_report(release()).release.as_dict()) is None


def test_malformed_reports_are_left_out_and_nothing_crashes(tmp_path: Path, state) -> None:
    replies = [
        node_reply("n1", moved(state, 0.01), privacy=release(epsilon=math.nan)),
        node_reply("n2", moved(state, 0.01), privacy={"node": "n2", "declined": "yes"}),
        node_reply("n3", moved(state, 0.01)),
    ]
    strategy = FedRecStrategy(RunConfig())
    received = privacy_reports(replies, NodeKeys(tmp_path / "keys"), "r", 1, strategy, sent=state)
    assert set(received.rejected) == {"n1", "n2"}
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports)
    updates, _ = strategy.node_updates(received.trusted(replies, strategy), state)
    assert [u.node for u in updates] == ["n3"]


def test_under_dp_an_update_without_a_signed_release_is_refused(tmp_path: Path, state) -> None:
    """Its customers' spending would be missing from the ledger (and the server's noise figure
    for the item biases unknown): under customer-level DP such an update is not used, while
    without DP a reply needs no report."""
    replies = [
        node_reply("n1", moved(state, 0.01)),
        node_reply("n2", moved(state, 0.01), privacy={"node": "n2", "refused": False}),
    ]
    strategy = FedRecStrategy(RunConfig(dp=True))
    keys = NodeKeys(tmp_path / "keys")
    received = privacy_reports(replies, keys, "r", 1, strategy, private=True, sent=state)
    assert set(received.rejected) == {"n1", "n2"}
    assert strategy.node_updates(received.trusted(replies, strategy), state)[0] == []
    plain = privacy_reports(replies, keys, "r", 1, FedRecStrategy(RunConfig()), sent=state)
    assert plain.rejected == {}


def test_a_refusal_outside_the_model_rounds_names_its_stage(tmp_path: Path) -> None:
    """Encoder and evaluation rounds are numbered from 1 like the model's: a refusal in one
    of them must not read as a refusal of the model round of the same number."""
    refusal = parse_report({"node": "n1", "refused": True, "reason": "requires DP"})
    decline = parse_report({"node": "n2", "declined": True, "reason": "spent", "epsilon": 2.0})
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, [refusal, decline], "train.encoder")
    record_privacy(ledger, 1, [refusal])
    record_privacy(ledger, 1, [refusal], "evaluate")
    stages = [(e["kind"], e["round"], e.get("stage")) for e in ledger.entries]
    assert stages == [
        ("refused", 1, "train.encoder"),
        ("declined", 1, "train.encoder"),
        ("refused", 1, None),
        ("refused", 1, "evaluate"),
    ]
    assert verify_chain(ledger.entries) == []


def test_a_forged_index_gap_adds_no_fake_spending(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    fields = {k: v for k, v in release().items() if k not in ("public_key", "refused", "declined")}
    ledger.append("contribution", **fields)
    forged = {**fields, "contribution_index": 10**9}
    assert record_lost_contributions(ledger, 2, "n1", forged) == []  # at once, nothing added
    assert len(ledger.entries) == 1 and verify_chain(ledger.entries) == []


# --- a registry: nodes are who the operator registered -------------------------------------


@pytest.fixture()
def registered(tmp_path: Path) -> FedRecStrategy:
    path = tmp_path / "registry.json"
    write_registry(
        path,
        {
            101: {"name": "merchant-a", "catalog": ["p1", "p3"], "customers": 100},
            102: {"name": "merchant-b", "catalog": None, "customers": 50},
        },
    )
    strategy = FedRecStrategy(RunConfig())
    strategy.registry = Registry.load(path, ITEMS)
    return strategy


def test_an_unregistered_or_impersonating_node_is_refused(registered, state) -> None:
    rows = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    replies = [
        node_reply("merchant-a", moved(state, 0.01, rows), 10, node_id=999),  # unknown id
        node_reply("merchant-a", moved(state, 0.01), 10, node_id=102),  # b claims to be a
        node_reply("merchant-a", moved(state, 0.01, rows), 10, node_id=101),
    ]
    updates, rejected = registered.node_updates(replies, state)
    assert [u.node for u in updates] == ["merchant-a"]
    assert "not in the registry" in rejected[0] and "speaks for" in rejected[1]


def test_rows_outside_the_registered_catalog_and_inflated_weights(registered, state) -> None:
    outside = dict.fromkeys(ITEM_TABLES, np.array([1, 5]))  # p5 is not merchant-a's
    inside = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    replies = [
        node_reply("merchant-a", moved(state, 0.5, outside), 10, node_id=101),
        node_reply("merchant-a", moved(state, 0.01), 10, node_id=101),  # a whole item table
        node_reply("merchant-b", moved(state, 0.01, inside), 1e12, node_id=102),
    ]
    updates, rejected = registered.node_updates(replies, state)
    assert "does not sell" in rejected[0] and "whole item table" in rejected[1]
    assert [(u.node, u.weight) for u in updates] == [("merchant-b", 50.0)]  # capped


def test_a_registry_that_names_unknown_products_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"7": {"name": "x", "catalog": ["nope"]}}))
    with pytest.raises(RegistryError, match="node '7'"):
        Registry.load(path, ITEMS)


def test_a_hostile_reported_number_is_left_out_of_the_round_history() -> None:
    """A node reports its loss, bytes and whether it reversed its histories as numbers; one
    that sends a list, NaN, infinity, a negative number or a share above 1 is left out of the
    round's means, never a crash."""
    replies = [
        node_reply("honest", None, metrics={"loss": 2.0, "reversed-histories": 1}),
        node_reply("list", None, metrics={"loss": [1.0, 9.0], "reversed-histories": [1, 1]}),
        node_reply("nan", None, metrics={"loss": float("nan"), "reversed-histories": 0}),
        node_reply("inf", None, metrics={"loss": float("inf"), "reversed-histories": 1e300}),
        node_reply("negative", None, metrics={"loss": -5.0, "bytes-up": -1}),
    ]
    result = RoundResult([], None, 5, 0, [], replies)
    assert result.mean_metric("loss") == 2.0
    assert result.mean_metric("reversed-histories") == 0.5
    assert result.mean_metric("bytes-up") is None


def test_nodes_sampling_every_customer_are_named_once_the_plan_has_more_than_two_rounds(
    caplog,
) -> None:
    """A node whose training release has a Poisson rate of 1 (no amplification by sampling)
    is named; a larger node, an evaluation release and a plan of two rounds are not."""
    reports = [
        parse_report(release(node="small", sample_rate=1.0)),
        parse_report(release(node="large", sample_rate=0.23)),
        parse_report(release(node="evaluating", purpose="evaluation", sample_rate=1.0)),
    ]
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        note_unamplified(reports, rounds=2)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        note_unamplified(reports, rounds=6)
    assert "1 node(s) (small)" in caplog.text and "each of the 6 rounds" in caplog.text
    assert "large" not in caplog.text and "evaluating" not in caplog.text


# --- records that are not what they say, and numbers too large to add ------------------------


def _header_only(rows: int) -> Array:
    """A few hundred bytes whose .npy header declares ``rows`` x 10**9 float32 values."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, 10**9)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return Array(
        dtype="float32", shape=(rows, 10**9), stype="numpy.ndarray", data=buffer.getvalue()
    )


def _object_array() -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return Array(dtype="O", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())


@pytest.mark.parametrize("hostile", ["config record", "torch stype", "object", "header", "bytes"])
def test_arrays_that_are_not_plain_numpy_arrays_are_refused_before_they_are_read(
    tmp_path: Path, state, hostile
) -> None:
    """Each used to crash the round (an AttributeError, a TypeError, a pickle refusal) or to
    allocate what a 200-byte header declared (36 GB): now the reply is left out, in training
    and in the privacy check alike."""
    evil = node_reply("evil", moved(state, 0.01), 10, privacy=release(node="evil"))
    arrays = evil.content["arrays"]
    table = arrays["id_in.weight"]
    if hostile == "config record":
        evil.content["arrays"] = ConfigRecord({"id_in.weight": 1})
    elif hostile == "torch stype":
        arrays["id_in.weight"] = Array(table.dtype, table.shape, "torch", table.data)
    elif hostile == "object":
        arrays["id_scores.bias"] = _object_array()
    elif hostile == "header":
        arrays["id_in.weight"] = _header_only(len(state["id_in.weight"]))
    else:
        arrays["id_in.weight"] = Array(
            dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage"
        )
    good = node_reply("good", moved(state, 0.01), 10)
    updates, rejected = FedRecStrategy(RunConfig()).node_updates([evil, good], state)
    assert [u.node for u in updates] == ["good"] and rejected[0].startswith("evil:")
    received = privacy_reports(
        [evil], NodeKeys(tmp_path / "keys"), "r", 1, FedRecStrategy(RunConfig()), True, sent=state
    )
    assert "malformed update" in received.rejected["evil"]


def test_a_weight_of_1e300_is_capped_and_the_mean_stays_finite(state) -> None:
    """Without a registry a claimed size is all there is, but it can no longer make the
    float32 mean NaN (which dropped every round); with one it is the registered figure."""
    replies = [
        node_reply("huge", moved(state, -0.03), 1e300),
        node_reply("honest", moved(state, 0.01), 100),
    ]
    strategy = FedRecStrategy(RunConfig(row_clip=0))  # the row bound off: the claim counts
    updates, rejected = strategy.node_updates(replies, state)
    assert rejected == [] and max(u.weight for u in updates) == MAX_CUSTOMERS
    new, _ = strategy.apply(state, updates)
    assert all(torch.isfinite(v).all() for v in new.values())


def test_a_node_claiming_many_customers_weighs_at_most_row_clip_median_nodes(state, caplog) -> None:
    """A node stating 10^9 customers beside four of 100 was the whole mean: its update,
    bounded by row-clip, applied undiluted (one sign-flipping node of five took the synthetic
    marketplace's test NDCG@10 from 0.0815 to 0.0220 in one round). It now weighs at most
    row-clip x the round's median node (its popularity counts too), so the four honest
    nodes' direction wins."""
    replies = [node_reply("h" * (i + 1), moved(state, 0.01), 100) for i in range(4)]
    replies.append(node_reply("evil", moved(state, -0.01), 1e9))
    replies[-1].content[COUNTS] = counts_record(np.full(8, 10**9))  # its popularity claim
    strategy = FedRecStrategy(RunConfig(row_clip=3.0))
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        updates, rejected = strategy.node_updates(replies, state)
    evil = next(u for u in updates if u.node == "evil")
    assert rejected == [] and evil.weight == 300 and evil.counts.tolist() == [300] * 8
    assert "node evil weighs 300 customers in the mean, not the 1e+09" in caplog.text
    new, _ = strategy.apply(state, updates)
    moved_by = new["id_scores.bias"] - state["id_scores.bias"]
    assert torch.allclose(moved_by, torch.tensor((4 * 100 - 300) * 0.01 / 700))


def test_a_registry_must_state_each_nodes_customers(tmp_path: Path) -> None:
    """A registered node of unknown size would weigh whatever it claims."""
    path = tmp_path / "registry.json"
    for customers in (None, 0, "many", 2.5):
        path.write_text(json.dumps({"7": {"name": "x", "catalog": None, "customers": customers}}))
        with pytest.raises(RegistryError, match="node '7'.*customers"):
            Registry.load(path, ITEMS)


def _evaluation(node: str, **metrics: float) -> Message:
    return node_reply(node, None, metrics=metrics)


HONEST = {"customers": 100, "hr@10": 0.2, "ndcg@10": 0.1, "valid-customers": 50}
HONEST |= {"valid-hr@10": 0.2, "valid-ndcg@10": 0.1}


@pytest.mark.parametrize("key", ["customers", "valid-customers"])
def test_customer_counts_too_large_to_add_are_bounded(key) -> None:
    """Two nodes claiming 1.7e308 customers overflowed the sums (an OverflowError ended the
    run); each reply now speaks for at most MAX_CUSTOMERS."""
    honest = _evaluation("honest", **HONEST)
    liars = [_evaluation(n, **(HONEST | {key: 1.7e308})) for n in ("e1", "e2")]
    summary = FedRecStrategy(RunConfig()).aggregate_evaluate(1, [honest, *liars])
    assert summary["customers"] <= 2 * MAX_CUSTOMERS + 100
    assert summary["valid"]["users"] <= 2 * MAX_CUSTOMERS + 50


def test_a_liar_claiming_many_validation_customers_does_not_choose_the_round() -> None:
    """A node answering validation NDCG@10 1.0 for 10^9 customers was the validation mean
    (without a registry), so it chose which round is kept; each answer now weighs at most
    row-clip x the median node's customers (3 x 50 here)."""
    honest = [_evaluation("h" * (i + 1), **HONEST) for i in range(4)]
    liar = _evaluation("liar", **(HONEST | {"valid-customers": 1e9, "valid-ndcg@10": 1.0}))
    liar.content["metrics"]["customers"] = 1e9
    liar.content["metrics"]["ndcg@10"] = 1.0
    summary = FedRecStrategy(RunConfig(row_clip=3.0)).aggregate_evaluate(1, [*honest, liar])
    assert summary["valid"]["users"] == 350
    assert summary["valid"]["ndcg@10"] == pytest.approx((4 * 50 * 0.1 + 150) / 350)
    assert summary["customers"] == 700
    assert summary["ndcg@10"] == pytest.approx((4 * 100 * 0.1 + 300) / 700)


def test_the_runs_setting_not_the_reply_says_whether_an_evaluation_is_private() -> None:
    """In a run without DP a reply of noisy sums used to switch the round to private answers
    (its validation then dropped, so the round was never a candidate); now it is not an
    evaluation. Under DP a noisy answer beyond its declared customers is left out."""
    noisy = {"noisy_customers": 1e-9, "noisy_sum_hr@10": 1e6, "noisy_sum_ndcg@10": 1e6}
    honest, evil = _evaluation("honest", **HONEST), _evaluation("evil", **noisy)
    summary = FedRecStrategy(RunConfig()).aggregate_evaluate(1, [honest, evil])
    assert summary["dp"] is False and summary["nodes"] == 1 and summary["ndcg@10"] == 0.1
    assert summary["valid"]["users"] == 50
    private = FedRecStrategy(RunConfig(dp=True))
    fair = {"noisy_customers": 99.0, "noisy_sum_hr@10": 21.0, "noisy_sum_ndcg@10": 9.5}
    summary = private.aggregate_evaluate(1, [evil, _evaluation("fair", **fair)])
    assert summary["dp"] is True and summary["nodes"] == 2  # no registry: bounded by 1e9
    registry = Registry({len("evil"): RegisteredNode("evil", None, 100)})
    private.registry = registry
    assert private.aggregate_evaluate(1, [evil]) is None  # 1e6 is beyond 100 customers


def test_a_report_that_names_its_node_id_instead_of_its_registered_name_is_refused(
    registered, state
) -> None:
    """Its update was used and its ledger entries booked under the id, apart from its name."""
    rows = dict.fromkeys(ITEM_TABLES, np.array([1, 3]))
    reply = node_reply("101", moved(state, 0.01, rows), 10, node_id=101)
    updates, rejected = registered.node_updates([reply], state)
    assert updates == [] and "registered as 'merchant-a'" in rejected[0]


def test_a_registered_merchant_may_send_the_encoders_weights(registered) -> None:
    """The encoder rounds carry no item table: a merchant registered with a catalog was
    refused for sending 'a whole item table' it never sent."""
    layers = {"layer.0.w": torch.ones(4, 4), "layer.0.b": torch.ones(4)}
    moved_layers = encode({k: v + 0.01 for k, v in layers.items()})
    reply = node_reply("merchant-a", moved_layers, 10, node_id=101)
    updates, rejected = registered.node_updates([reply], layers)
    assert rejected == [] and [u.node for u in updates] == ["merchant-a"]


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "dp"])
@pytest.mark.parametrize("twice", ["the same reply", "another node claiming its name"])
def test_a_second_reply_for_a_node_leaves_the_nodes_replies_out(
    tmp_path: Path, state, twice: str, private: bool
) -> None:
    """One node's update counted twice (double its weight), or another node's under its name,
    was aggregated (found fuzzing); now every reply for a node heard from twice in a round is
    left out, the first one's report still recorded and the second one's as unverified."""
    key = NodeKey.load_or_create(tmp_path / "node.key")
    arrays = moved(state, 0.01)

    def sent(node: str, node_id: int, update: dict[str, np.ndarray]) -> Message:
        privacy = None
        if private:
            fields = {f: v for f, v in release(node=node).items() if f in SIGNED_FIELDS}
            fields["update_digest"] = digest_arrays(update)
            privacy = {**fields, "signature": key.sign(fields), "key_id": key.key_id}
            privacy |= {"public_key": key.public_pem, "refused": False, "declined": False}
        return node_reply(node, update, 10, node_id=node_id, privacy=privacy)

    first = sent("n1", 1, arrays)
    second = first if twice == "the same reply" else sent("n1", 2, moved(state, 0.5))
    replies = [first, second, sent("n2", 3, arrays)]
    # the plan of helpers.release: 100 customers, a sample rate of 0.5, 2 steps
    strategy = FedRecStrategy(RunConfig(dp=private, dp_batch_size=50, dp_local_epochs=1))
    received = privacy_reports(
        replies, NodeKeys(tmp_path / "keys"), "r", 1, strategy, private, sent=state
    )
    assert set(received.rejected) == {"n1"} and "a second reply" in received.rejected["n1"]
    updates, rejected = strategy.node_updates(received.trusted(replies, strategy), state)
    assert [u.node for u in updates] == ["n2"] and rejected == []
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    record_privacy(ledger, 1, received.reports, unverified=received.unverified)
    kinds = [(e["kind"], e["node"]) for e in ledger.entries]
    expected = [("contribution", "n1"), ("contribution", "n2")] if private else []
    assert kinds == [*expected, ("unverified", "n1")] and verify_chain(ledger.entries) == []


def _with_counts(state, record: object, customers: float = 10) -> Message:
    """A node's honest update whose reply also carries ``record`` as its item counts."""
    reply = node_reply("counter", moved(state, 0.01), customers)
    reply.content[COUNTS] = record
    return reply


@pytest.mark.parametrize(
    "record, words",
    [
        (counts_record(np.array([1, 0, 2, 0, 0, 0, 0, 10])), None),  # honest: kept
        (ArrayRecord({COUNTS: Array(np.full(8, np.nan))}), "expected (8,) integers"),
        (ArrayRecord({COUNTS: Array(np.full(8, 1.0))}), "expected (8,) integers"),
        (counts_record(np.ones(7)), "expected (8,) integers"),
        (counts_record(np.ones((2, 4))), "expected (8,) integers"),
        (counts_record(np.ones(9)), "at most 8 expected"),
        (counts_record(np.array([1, -1, 0, 0, 0, 0, 0, 0])), "outside [0, 10]"),
        (counts_record(np.array([11, 0, 0, 0, 0, 0, 0, 0])), "outside [0, 10]"),
        (ArrayRecord({COUNTS: Array(np.full(8, 2**64 - 1, dtype=np.uint64))}), "outside"),
        (ConfigRecord({COUNTS: 1}), "expected an ArrayRecord"),
        (ArrayRecord({COUNTS: Array(np.ones(8, dtype=np.int64)), "x": Array(np.ones(1))}), "alone"),
    ],
)
def test_item_counts_that_no_honest_node_sends_are_rejected(state, record, words) -> None:
    """A node's item counts (the popularity prior's, without DP) are hostile input: a vector of
    the catalog's length of integers from 0 to its customers, else its reply is rejected
    (never a crash); under DP they are never read."""
    updates, rejected = FedRecStrategy(RunConfig()).node_updates(
        [_with_counts(state, record)], state
    )
    if words is None:
        assert rejected == [] and updates[0].counts.tolist() == [1, 0, 2, 0, 0, 0, 0, 10]
    else:
        assert updates == [] and words in rejected[0]
    private = FedRecStrategy(RunConfig(dp=True)).node_updates([_with_counts(state, record)], state)
    assert all(u.counts is None for u in private[0])


def test_a_huge_declared_counts_vector_is_refused_before_it_is_read(state) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)}
    )
    huge = Array(dtype="int64", shape=(10**12,), stype="numpy.ndarray", data=buffer.getvalue())
    record = ArrayRecord({COUNTS: huge})
    updates, rejected = FedRecStrategy(RunConfig()).node_updates(
        [_with_counts(state, record)], state
    )
    assert updates == [] and "at most 8 expected" in rejected[0]
