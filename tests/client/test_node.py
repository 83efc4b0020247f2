"""A node's local work (client/node.py)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_DEVICE, TINY_SETTINGS

from client.accountant import NodePrivacy
from client.node import load_node, local_epochs, private_sums, scored_catalog, train_node
from client.policy import NodePolicy
from client.request import valid_fraction
from shared.data.dataset import DataError, load_dataset
from shared.data.partition import cold_item_indices, write_partitions
from shared.federation.wire import COUNTS, ITEM_TABLES, trainable_state
from shared.recommender.model import FusionRecommender
from shared.recommender.text import embed_items
from shared.runs.config import RunConfig


def test_a_small_node_trains_enough_epochs_for_local_steps() -> None:
    config = RunConfig(local_epochs=1, local_steps=50, local_batch_size=32, max_local_epochs=99)
    assert local_epochs(200, config) == 8  # 7 steps an epoch
    assert local_epochs(3_000, config) == 1  # 94 steps an epoch: local-epochs rules
    assert local_epochs(0, config) == 50  # an empty node: one (empty) step an epoch
    assert local_epochs(200, RunConfig(local_epochs=2, local_steps=0)) == 2


def test_a_tiny_node_takes_at_most_max_local_epochs_passes_a_round() -> None:
    """A merchant of 30 customers (one step an epoch) would take 20 epochs for local-steps
    20; it takes max-local-epochs, unless local-epochs asks for more."""
    assert local_epochs(30, RunConfig(local_steps=20)) == 3
    assert local_epochs(30, RunConfig(local_steps=20, max_local_epochs=5)) == 5
    assert local_epochs(30, RunConfig(local_steps=20, local_epochs=4)) == 4
    assert local_epochs(3_000, RunConfig(local_steps=20)) == 1


def test_by_default_a_small_node_trains_a_few_epochs_a_round_not_many() -> None:
    """The default local work: a node of 400 customers (13 steps an epoch) trains 2 epochs a
    round, not the 4 that overfit small sparse nodes (docs/evaluation.md); a regional Beauty
    node (2,200 customers, 69 steps an epoch) one."""
    assert local_epochs(400, RunConfig()) == 2
    assert local_epochs(2_200, RunConfig()) == 1


def test_a_node_refuses_a_validation_share_that_is_not_a_fraction() -> None:
    """Whatever the server sends as valid-fraction, a node takes a number in [0, 1] or refuses
    (a hostile value is an error reply, never a crash or a silent default)."""
    assert valid_fraction({}) == 0.0 and valid_fraction({"valid-fraction": 0.25}) == 0.25
    for hostile in (1.5, -0.1, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="valid-fraction"):
            valid_fraction({"valid-fraction": hostile})


def test_the_nodes_a_process_hosts_share_one_copy_of_the_catalog_text(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    first, second = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[:2]
    load_node.cache_clear()
    one, two = (load_node(str(d), str(tiny_bert_dir)) for d in (first, second))
    assert one.name != two.name and one.catalog_digest == two.catalog_digest
    assert one.text is two.text  # embedded (or read from the cache) once
    items = load_dataset(first).items
    embedded = embed_items(items, str(tiny_bert_dir), show_progress=False)
    assert torch.equal(one.text, torch.from_numpy(embedded))


@pytest.mark.parametrize(
    ("edit", "where", "words"),
    [
        (lambda c: c + ["NOPE-1"], "node.json", "names 1 product(s) not in the items table"),
        (lambda c: [], "node.json", "its catalog is empty"),
        (lambda c: c[1:], "interactions.csv.gz, row ", "is not in this node's catalog"),
    ],
    ids=["unknown-product", "empty", "events-outside"],
)
def test_a_merchant_catalog_that_does_not_fit_its_data_is_a_data_error(
    tiny_synth_dataset_dir: Path, tmp_path: Path, edit, where: str, words: str
) -> None:
    """A node.json catalog naming products the items table lacks, none at all, or fewer than
    the node's events are on: an error naming the file (and row), not products silently left
    out, events silently not trained on, or a reshape error in training."""
    dataset = load_dataset(tiny_synth_dataset_dir)
    directory = write_partitions(dataset, tmp_path, 2, scheme="merchant")[0]
    info = json.loads((directory / "node.json").read_text())
    sold = set(info["catalog"])
    first_sold = next(i for i in load_dataset(directory).interactions.sort_values("row")["item_id"])
    info["catalog"] = edit([first_sold] + sorted(sold - {first_sold}))
    (directory / "node.json").write_text(json.dumps(info))
    load_node.cache_clear()
    with pytest.raises(DataError, match=re.escape(words)) as error:
        load_node(str(directory), "unused: refused before the text is embedded")
    assert str(directory / where.split(",")[0]) in str(error.value) and where in str(error.value)


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_products_a_simulation_holds_out_as_new_are_never_trained_at_a_node(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path, dp: bool
) -> None:
    """With cold-items, a node's softmax leaves the held-out products out (as fedrec train
    does): their rows are neither trained as negatives nor sent, so the server fills them from
    their text like any product nobody trained."""
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(
        **TINY_SETTINGS, device=TEST_DEVICE, dp=dp, cold_items=0.2, text_model=str(tiny_bert_dir)
    )
    node = load_node(str(directory), config.text_model)
    cold = cold_item_indices(len(node.items), 0.2, config.seed)
    scored = scored_catalog(node, config)
    assert len(scored) == len(node.items) - len(cold) and not np.isin(scored, cold).any()
    assert scored_catalog(node, replace(config, cold_items=0.0)) is None  # a regional node
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    state = trainable_state(model)
    result = train_node(node, config, state, server_round=1)
    sent = result["rows"]["id_scores.weight"]
    assert len(sent) and not np.isin(sent, cold).any()
    rows = torch.as_tensor(cold + ITEM_TABLES["id_scores.weight"])
    assert torch.equal(result["state"]["id_scores.weight"][rows], state["id_scores.weight"][rows])


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_a_node_learns_its_histories_backwards_only_without_dp(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path, dp: bool
) -> None:
    """Told reverse-histories=on (the server decides for every node), a node learns its
    histories backwards too, never under DP, where each customer is one sample; the customers
    it reports are the customers, not the sequences."""
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=dp, text_model=str(tiny_bert_dir))
    node = load_node(str(directory), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    state = trainable_state(model)
    auto = train_node(node, config, state, server_round=1)
    assert auto["reversed"] is False
    if dp:
        return  # reverse-histories=on with dp is refused by the settings (test_config)
    forced = train_node(node, replace(config, reverse_histories="on"), state, server_round=1)
    assert forced["reversed"] is True and forced["customers"] == auto["customers"]
    assert forced["loss"] != auto["loss"]  # it trained on the reversed sequences too


def test_a_private_answer_leaves_the_node_rounded_to_the_float32_grid() -> None:
    """A private evaluation's or start guard's answer was the float64 sum of its customers'
    values plus a float64 Gaussian, sent as it was: its low bits, finer than any float32
    weight's, are what floating-point attacks on the Gaussian mechanism read (docs/privacy.md,
    "Randomness"). It is rounded to float32 before it leaves, as a DP-SGD release is."""
    values = np.random.default_rng(0).random((50, 3))
    answers = np.concatenate([private_sums(values, 10.0) for _ in range(50)])
    assert all(float(np.float32(answer)) == float(answer) for answer in answers)
    assert abs(answers.mean() - values.sum(0).mean()) < 10.0  # still the noisy sums


def test_a_private_request_that_trains_nothing_is_refused_before_any_charge(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """``dp-train=bias`` asks a text-only model (no item biases) to train nothing: the node
    refuses the request before its accountant charges anything (it charged, then failed)."""
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(
        **TINY_SETTINGS | {"variant": "text"},
        device=TEST_DEVICE,
        dp=True,
        dp_train="bias",
        text_model=str(tiny_bert_dir),
    )
    node = load_node(str(directory), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    result = train_node(node, config, trainable_state(model), server_round=1)
    assert result["refused"] is True and "leaves nothing to train" in result["reason"]
    assert NodePrivacy(directory).state["contributions"] == 0  # nothing charged


def test_popularity_counts_leave_a_simulated_node_without_dp_and_never_a_deployed_one(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """From the review: the counts (the server's popularity prior) left any node whose request
    asked for them without DP, a deployed one too, though a deployment adds no prior: the
    request's settings are the server's to write. Now a simulated node sends them (per
    product, how many of its histories hold it, at most its customers) and a deployed one
    (``data-dir`` in its node config) never does."""
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, text_model=str(tiny_bert_dir))
    assert config.counts_popularity
    node = load_node(str(directory), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    state = trainable_state(model)
    simulated = train_node(node, config, state, server_round=1)
    counts = simulated[COUNTS]
    assert counts.shape == (len(node.text),) and counts.dtype.kind == "i"
    assert counts.min() >= 0 and 0 < counts.max() <= simulated["customers"]
    deployed = NodePolicy.from_node_config(
        {"data-dir": str(directory), "require-dp": False, "min-exact-customers": 0}
    )
    assert deployed.deployed
    sent = train_node(node, config, state, server_round=1, policy=deployed)
    assert "state" in sent and COUNTS not in sent
