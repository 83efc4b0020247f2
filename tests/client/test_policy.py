"""A node's own privacy policy (client/policy.py) and what a DP node lets out (client/node.py):
requests weaker than the policy are refused with nothing spent, the node picks its own delta
from its public customer figure, and its federated evaluation is noisy and charged."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_DEVICE, TINY, TINY_SETTINGS

from client.accountant import NodePrivacy
from client.node import (
    evaluate_node,
    guard_node,
    load_node,
    private_sums,
    train_node,
)
from client.policy import (
    NodePolicy,
    PolicyError,
    parse_node_config,
    planned_steps,
    releases_exceed,
    step_activations,
)
from server.privacy.ledger import read_ledger
from shared.data.dataset import load_dataset
from shared.data.partition import write_partitions
from shared.federation.node_directory import NodeInfo, round_down_2sf
from shared.federation.wire import trainable_state
from shared.recommender.metrics import RANK_BATCH
from shared.recommender.model import FusionRecommender
from shared.recommender.training import planned_epsilon, training_tensors
from shared.runs.config import RunConfig
from simulations.cli import main

CUSTOMERS = 2_200  # a node's public customer figure, about a regional Beauty node's


def test_a_deployed_node_requires_dp_by_default_and_a_simulated_one_does_not() -> None:
    deployed = NodePolicy.from_node_config({"data-dir": "/data"})
    assert deployed.require_dp and deployed.max_epsilon == 8.0
    assert deployed.min_exact_customers == 50 and deployed.max_epochs == 10
    assert deployed.max_rounds == 20 and deployed.max_steps == 10_000
    assert deployed.max_secagg_shares == 200
    assert deployed.max_model_weights == 500_000_000 and deployed.text_models == ("minilm",)
    assert deployed.max_step_activations == 500_000_000 and deployed.max_answer_share == 0.25
    assert NodePolicy.from_node_config({"partition-id": 0}) == NodePolicy()
    relaxed = NodePolicy.from_node_config({"data-dir": "/data", "require-dp": "false"})
    assert not relaxed.require_dp


@pytest.mark.parametrize(
    "request_settings, words",
    [
        ({"dp": False}, "require-dp=true"),
        ({"dp": True, "target_epsilon": 8.0}, "max-epsilon=4"),
        ({"dp": True, "target_epsilon": 4.0, "delta": 1e-3}, "max-delta=1e-05"),
    ],
)
def test_a_request_weaker_than_the_policy_is_refused_naming_the_policy(
    request_settings: dict, words: str
) -> None:
    policy = NodePolicy(require_dp=True, max_epsilon=4.0, max_delta=1e-5)
    reason = policy.refusal(RunConfig(**request_settings), CUSTOMERS)
    assert reason is not None and words in reason
    assert policy.refusal(RunConfig(dp=True, target_epsilon=4.0), CUSTOMERS) is None
    for noise in (0.0, -10.0):  # no server can ask for an exact evaluation under DP
        assert "eval-noise-multiplier" in policy.refusal(
            RunConfig(dp=True, target_epsilon=4.0, eval_noise_multiplier=noise), CUSTOMERS
        )
    assert policy.refusal(RunConfig(dp=True, target_epsilon=2.0, delta=1e-6), CUSTOMERS) is None
    for name in ("dp_batch_size", "dp_encoder_batch"):  # no sample rate to account
        for batch in (0, -5):
            request = unchecked(RunConfig(dp=True, target_epsilon=4.0), **{name: batch})
            assert name.replace("_", "-") in policy.refusal(request, CUSTOMERS)
    for batch in (0, -5):  # no batch to step on: a zero divided the node's epochs, a crash
        plain = unchecked(RunConfig(), local_batch_size=batch)
        assert "local-batch-size" in NodePolicy().refusal(plain, CUSTOMERS)
        assert NodePolicy().refusal(plain, CUSTOMERS, training=False) is None


def test_a_request_for_more_passes_than_the_node_allows_is_refused() -> None:
    """The operator sets the local work; a node's max-epochs bounds it, with or without DP,
    counting a history learnt both ways (reverse-histories) as two passes."""
    policy = NodePolicy(max_epochs=10)
    # the defaults: 1 epoch, 3 for a small node
    assert policy.refusal(RunConfig(), CUSTOMERS) is None
    assert policy.refusal(RunConfig(dp=True), CUSTOMERS) is None  # dp-local-epochs 3
    both_ways = RunConfig(max_local_epochs=5, reverse_histories="on")  # 10 passes
    assert policy.refusal(both_ways, CUSTOMERS) is None
    assert policy.refusal(RunConfig(max_local_epochs=6, reverse_histories="off"), CUSTOMERS) is None
    # node-level DP never reverses, whatever auto would say: its passes count once
    assert policy.refusal(RunConfig(max_local_epochs=6, node_dp=True), CUSTOMERS) is None
    for settings in (
        {"local_epochs": 50},
        {"max_local_epochs": 11},
        {"dp": True, "dp_local_epochs": 500},
        {"max_local_epochs": 6, "reverse_histories": "on"},  # each history learnt both ways
        {"max_local_epochs": 6, "reverse_histories": "auto"},  # the node might decide on
    ):
        reason = policy.refusal(RunConfig(**settings), CUSTOMERS)
        assert reason is not None and "max-epochs=10" in reason, settings
    # a simulated node: no cap
    assert NodePolicy().refusal(RunConfig(local_epochs=500), CUSTOMERS) is None


def test_a_model_larger_than_the_node_allows_is_refused() -> None:
    """Settings within every range can still ask for a model no node's memory holds (a
    million products at dim 4096 is 8 billion weights); the node's max-model-weights bounds it."""
    policy = NodePolicy.from_node_config({"data-dir": "/data"})
    small = RunConfig().model_config(12_101, 384)
    assert policy.model_refusal(small) is None  # Amazon Beauty's default model
    huge = RunConfig(dim=4096, heads=2).model_config(1_000_000, 384)
    reason = policy.model_refusal(huge)
    assert reason is not None and "max-model-weights=500000000" in reason
    assert f"{huge.weight_count():,} weights" in reason
    assert NodePolicy().model_refusal(huge) is None  # a simulated node: no cap
    tight = NodePolicy.from_node_config({"data-dir": "/d", "max-model-weights": 1000})
    assert tight.model_refusal(small) is not None


def test_a_deployed_node_loads_only_the_text_models_its_operator_lists(tmp_path: Path) -> None:
    """The server names the text model a node loads (``text-model``, a name or a local path):
    a deployed node loads the packaged MiniLM only unless its operator lists more, and refuses
    any other name alike, existing directory or not, saying nothing of its files."""
    deployed = NodePolicy.from_node_config({"data-dir": "/data"})
    assert deployed.text_model_refusal("minilm") is None
    checkpoint = tmp_path / "bert"
    (checkpoint / "config.json").parent.mkdir()
    (checkpoint / "config.json").write_text("{}")
    existing, missing = str(checkpoint), str(tmp_path / "missing")
    reasons = {name: deployed.text_model_refusal(name) for name in (existing, missing, "/etc")}
    assert all(reason and "text-models" in reason for reason in reasons.values())
    # the same words for a checkpoint, a missing path and a system directory
    assert len({re.sub("'.*'", "NAME", reason) for reason in reasons.values()}) == 1
    assert "..." in deployed.text_model_refusal("x" * 10**6)  # a long name is cut short
    listed = parse_node_config(f"text-models=minilm,{checkpoint}")
    policy = NodePolicy.from_node_config({"data-dir": "/data", **listed})
    assert policy.text_models == ("minilm", str(checkpoint))
    assert policy.text_model_refusal(existing) is None
    reason = policy.text_model_refusal(missing)
    assert reason is not None and existing not in reason  # never what the node has
    assert NodePolicy().text_model_refusal("/etc") is None  # a simulated node: any


def test_a_step_larger_than_the_node_allows_is_refused() -> None:
    """A batch size the server chooses sets what one step allocates (its scores: customers x
    positions x products, and its attention): a deployed node accepts every default setting
    of Amazon Beauty (12,101 products, 2,236 customers a node) and refuses a step above its
    max-step-activations, counted from the request and its public customer figure alone."""
    policy = NodePolicy.from_node_config({"data-dir": "/data"})
    beauty, customers = 12_101, 2_200

    def refusal(node: NodePolicy, request: RunConfig, at: int = customers) -> str | None:
        return node.step_refusal(request, request.model_config(beauty, 384), at)

    defaults = (
        RunConfig(),
        RunConfig(dp=True),
        RunConfig(dp=True, text_finetune_layers=2),  # an encoder step: 8 customers a pass
        RunConfig(node_dp=True),
        RunConfig(reverse_histories="on"),
        RunConfig(dp=True, dp_batch_size=10**7),  # every customer every step, four passes
    )
    for request in defaults:
        assert refusal(policy, request) is None, request
    private = RunConfig(dp=True)
    assert step_activations(private, private.model_config(beauty, 384), customers) == (
        128 * 20 * beauty + 128 * 20**2 * (2 * 2 + 1)  # 512 customers in 4 passes, 2 layers
    )
    huge = RunConfig(dp=True, dp_batch_size=10**7)
    reason = refusal(policy, huge, 100_000)  # the Poisson batch: every customer of a big node
    assert reason is not None and "max-step-activations=500000000" in reason
    assert "dp-batch-size 10000000" in reason and "12,101 products" in reason
    assert f"{step_activations(huge, huge.model_config(beauty, 384), 100_000):,}" in reason
    wide = RunConfig(local_batch_size=10**6, reverse_histories="off")
    assert "local-batch-size 1000000" in refusal(policy, wide)
    # attention: a long history and many heads, one customer a step
    attending = RunConfig(dp=True, dp_batch_size=1, dp_max_len=4096, heads=128)
    assert "4096 positions" in refusal(policy, attending)
    for request in (huge, wide, attending):  # a simulated node: no cap
        assert refusal(NodePolicy(), request, 100_000) is None
    tight = NodePolicy.from_node_config({"data-dir": "/d", "max-step-activations": 1000})
    assert refusal(tight, RunConfig()) is not None
    assert parse_node_config("max-step-activations=1e9") == {"max-step-activations": "1e9"}
    with pytest.raises(PolicyError, match="max-step-activations"):
        parse_node_config("max-step-activations=0")


def test_an_evaluation_is_bounded_by_what_it_ranks_not_by_the_training_batch() -> None:
    """An evaluation (or the start guard's comparison) takes no training step: a deployed
    node refused to evaluate at a dp-batch-size of 10^7, a batch it never builds for it. It
    is bounded by what it ranks at once (512 customers), which a long history still exceeds."""
    policy, beauty, customers = NodePolicy.from_node_config({"data-dir": "/d"}), 12_101, 100_000
    huge = RunConfig(dp=True, dp_batch_size=10**7)
    model = huge.model_config(beauty, 384)
    assert policy.step_refusal(huge, model, customers) is not None  # training: refused
    assert policy.step_refusal(huge, model, customers, training=False) is None
    ranking = model.activation_count(RANK_BATCH, training=False)
    assert step_activations(huge, model, customers, training=False) == ranking
    attending = RunConfig(dp=True, dp_max_len=4096, heads=16)
    reason = policy.step_refusal(attending, attending.model_config(beauty, 384), 2_200, False)
    assert reason is not None and "customers ranked at once 512" in reason


def test_the_node_picks_its_own_delta_below_one_over_its_customers() -> None:
    policy = NodePolicy()
    assert policy.delta(RunConfig(dp=True), 2_000) == pytest.approx(1 / 20_000)
    assert policy.delta(RunConfig(dp=True, delta=1e-7), 2_000) == 1e-7  # a stricter request
    assert NodePolicy(max_delta=1e-6).delta(RunConfig(dp=True), 100) == 1e-6


def test_the_public_customer_figure_never_is_the_exact_count() -> None:
    assert [round_down_2sf(n) for n in (7, 99, 100, 2_236, 22_363)] == [7, 99, 100, 2_200, 22_000]
    assert NodePolicy(declared_customers=5_000).customers(2_236, 2_200) == 5_000
    assert NodePolicy().customers(2_236, 2_100) == 2_100  # node.json's
    assert NodePolicy().customers(2_236, None) == 2_200


@pytest.mark.parametrize("figure", [-5, 0, 2500.5, True, "2500", float("inf"), float("nan")])
def test_a_node_json_figure_below_one_customer_is_refused(tmp_path, figure) -> None:
    """node.json's customers -5 was read as -5 customers: delta 1 / (10 x 1) = 0.1."""
    (tmp_path / "node.json").write_text(f'{{"node": "n", "customers": {json.dumps(figure)}}}')
    with pytest.raises(ValueError, match="not a valid node description .customers"):
        NodeInfo.read(tmp_path)
    (tmp_path / "node.json").write_text('{"node": "n", "customers": 2500.0}')
    assert NodeInfo.read(tmp_path).customers == 2500


@pytest.mark.parametrize(
    "text, words",
    [
        ("require-dp=maybe", "true or false"),
        ("max-epsilon=-1", "above 0"),
        ("max-delta=2", "below 1"),
        ("max_epsilon=4", "unknown key"),
        ("require-dp", "key=value"),
        ("min-exact-customers=2.5", "whole number"),
        ("min-exact-customers=-1", "whole number"),
        ("max-epochs=0", "whole number >= 1"),
        ("max-epochs=2.5", "whole number"),
        ("max-rounds=0", "max-rounds=.0.: expected a whole number >= 1"),
        ("max-steps=-3", "max-steps=.-3.: expected a whole number >= 0"),
        ("max-secagg-shares=0", "max-secagg-shares=.0.: expected a whole number >= 1"),
        ("text-models=,", "text-models=.,.: expected names or paths"),
        # read as 0 customers: delta 1 / (10 x 1) = 0.1, at which a history may be published
        ("declared-customers=0.5", "declared-customers=.0.5.: expected a whole number"),
        ("declared-customers=2500.7", "declared-customers=.2500.7.: expected a whole number"),
    ],
)
def test_a_bad_node_config_is_refused_with_the_key_and_value(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        parse_node_config(text)


@pytest.fixture()
def node_setup(tiny_synth_dataset_dir: Path, tmp_path: Path):
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    load_node.cache_clear()
    config = RunConfig(
        **TINY_SETTINGS, device=TEST_DEVICE, dp=True, target_epsilon=4.0, dp_rounds=2
    )
    node = load_node(str(directory), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    return node, config, trainable_state(model)


def test_a_refused_request_spends_nothing_and_sends_no_weights(node_setup) -> None:
    node, config, state = node_setup
    policy = NodePolicy(require_dp=True, max_epsilon=2.0, max_steps=50)
    tiny_batch = RunConfig(**{**config.to_dict(), "target_epsilon": 2.0, "dp_batch_size": 1})
    for request, words in (
        (RunConfig(**{**config.to_dict(), "dp": False}), "require-dp=true"),
        (config, "max-epsilon=2"),
        (tiny_batch, "max-steps=50"),
    ):
        report = train_node(node, request, state, server_round=1, policy=policy)
        assert report["refused"] is True and words in report["reason"]
        assert "state" not in report and "rows" not in report
        assert not NodePrivacy(node.directory).path.exists()  # nothing spent, nothing written


def test_max_epochs_bounds_training_never_an_evaluation(node_setup) -> None:
    """A node that refuses a round's training still evaluates the model (one pass)."""
    node, config, state = node_setup
    greedy = RunConfig(**{**config.to_dict(), "dp_local_epochs": 50})
    policy = NodePolicy(max_epochs=10)
    trained = train_node(node, greedy, state, server_round=1, policy=policy)
    assert trained["refused"] is True and "max-epochs=10" in trained["reason"]
    evaluated = evaluate_node(node, greedy, state, policy=policy)
    assert "refused" not in evaluated and evaluated["customers"] > 0


def test_a_dp_node_trains_on_its_public_figure_and_own_delta(node_setup) -> None:
    node, config, state = node_setup
    report = train_node(node, config, state, server_round=1, policy=NodePolicy(max_epsilon=4.0))
    declared = NodeInfo.read(node.directory).customers
    assert report["customers"] == declared
    assert report["delta"] == pytest.approx(1 / (10 * declared))
    assert report["sample_rate"] == pytest.approx(min(1.0, config.dp_batch_size / declared))
    assert 0 < report["epsilon"] <= 4.0 and report["purpose"] == "training"


def test_private_evaluation_is_noisy_charged_and_declined_past_the_budget(node_setup) -> None:
    node, config, state = node_setup
    first = evaluate_node(node, config, state)
    second = evaluate_node(node, config, state)
    assert first["mechanism"] == "gaussian" and first["purpose"] == "evaluation"
    assert first["noise_multiplier"] == config.eval_noise_multiplier
    assert first["noisy_customers"] != second["noisy_customers"]  # fresh noise each time
    assert "hr@10" not in first and "ndcg@10" not in first  # no exact figure leaves
    privacy = NodePrivacy(node.directory)
    assert privacy.state["contributions"] == 2  # both charged to the node's accountant
    assert second["epsilon"] > first["epsilon"] > 0
    # (without the start guard, whose one comparison alone would not fit so tight a budget:
    # the policy would refuse the request before the accountant could decline it)
    tight = {"target_epsilon": second["epsilon"] * 1.01, "dp_guard": False}
    third = evaluate_node(node, RunConfig(**{**config.to_dict(), **tight}), state)
    assert third["declined"] is True and "budget" in third["reason"]
    assert NodePrivacy(node.directory).state["contributions"] == 2


def test_the_start_guard_answers_the_gain_privately_and_only_under_dp(
    node_setup, monkeypatch
) -> None:
    """The guard's answer is the node's customers' summed NDCG@10 (on their held-out last
    events) of the rounds' model less the start's, noisy at ``dp-guard-noise-scale`` x
    sqrt(its declared customers) and charged before it leaves; a request without DP gets no
    answer."""
    node, config, state = node_setup
    same = guard_node(node, config, state, state)
    assert same["purpose"] == "guard" and same["mechanism"] == "gaussian"
    assert same["noise_multiplier"] == config.dp_guard_noise_scale * np.sqrt(same["customers"])
    assert same["steps"] == 1
    assert same["noisy_gain"] != 0.0  # no gain, but noise
    assert NodePrivacy(node.directory).state["contributions"] == 1
    exact_request = RunConfig(**{**config.to_dict(), "dp": False})
    refused = guard_node(node, exact_request, state, state)
    assert refused["refused"] is True and "only under DP" in refused["reason"]
    assert NodePrivacy(node.directory).state["contributions"] == 1  # nothing more spent
    # noise aside: a model whose item biases rank at random loses what the start scored
    monkeypatch.setattr("client.node.private_sums", lambda values, sigma: values.sum(0))
    scrambled = {**state, "id_scores.bias": torch.randn_like(state["id_scores.bias"]) * 1e3}
    lost = guard_node(node, config, scrambled, state)["noisy_gain"]
    assert lost < -1.0
    assert guard_node(node, config, state, scrambled)["noisy_gain"] == pytest.approx(-lost)


@pytest.mark.parametrize("guard", [True, False])
def test_a_node_that_answers_the_guard_never_trains_on_the_events_it_compares_on(
    node_setup, monkeypatch, guard: bool
) -> None:
    """The guard compares each customer's last event: a node that answers it holds that event
    out of every private round (a comparison on trained events favours the rounds' model);
    without the guard the node trains on all it holds."""
    node, config, state = node_setup
    config = RunConfig(**{**config.to_dict(), "dp_guard": guard})
    trained: list[list[int]] = []

    def recorded(sequences, max_len):
        trained.extend(list(map(int, s)) for s in sequences)
        return training_tensors(sequences, max_len)

    monkeypatch.setattr("client.node.training_tensors", recorded)
    train_node(node, config, state, server_round=1)
    split = node.split
    compared = [
        (split.history(u, "test").tolist(), int(split.test_target[u])) for u in split.test_users
    ]
    assert len(compared) > 10
    with_last = sum(before + [last] in trained for before, last in compared)
    without_last = sum(before in trained for before, _ in compared)
    if guard:  # every compared event held out, the events before it trained
        assert with_last == 0 and without_last == len(compared)
    else:
        assert with_last == len(compared)


def unchecked(config: RunConfig, **changes) -> RunConfig:
    """``config`` with ``changes`` as a request might carry them past the settings' own checks
    (which refuse NaN and infinity): the node's policy refuses them on its own as well."""
    request = copy.copy(config)
    for name, value in changes.items():
        setattr(request, name, value)
    if any(isinstance(v, float) and not math.isfinite(v) for v in changes.values()):
        with pytest.raises(ValueError, match="finite"):
            RunConfig(**{**config.to_dict(), **changes})
    return request


@pytest.mark.parametrize(
    "noise, words",
    [
        (1e-3, "alone spend more than"),
        (1e-9, "outside [0.001, 1e+06]"),  # a noise multiplier the server would not account
        (0.0, "outside [0.001, 1e+06]"),
        (float("nan"), "outside [0.001, 1e+06]"),
    ],
)
def test_a_guard_noise_too_small_for_the_budget_is_refused_before_anything_is_spent(
    node_setup, noise: float, words: str
) -> None:
    """A curious operator asking for a near-exact start guard (a tiny, zero or NaN
    ``dp-guard-noise-scale``, or one whose noise multiplier the server does not account)
    gets a refusal from the node's policy, for training and for the
    guard alike, and nothing is computed or charged."""
    node, config, state = node_setup
    exact = unchecked(config, dp_guard_noise_scale=noise)
    for reason in (
        NodePolicy().refusal(exact, CUSTOMERS),
        train_node(node, exact, state, server_round=1)["reason"],
        guard_node(node, exact, state, state)["reason"],
    ):
        assert words in reason and "dp-guard-noise-scale" in reason
    assert not NodePrivacy(node.directory).path.exists()  # nothing spent, nothing written


def test_exact_figures_over_too_few_customers_never_leave(node_setup) -> None:
    """Without DP an evaluation is exact: an operator that shrinks ``valid-fraction`` to a
    customer or two must not read their hits; the node's floor leaves such figures out."""
    node, config, state = node_setup
    exact = RunConfig(**{**config.to_dict(), "dp": False})
    test_customers = len(node.split.test_users)
    one = 1.5 / test_customers  # a share that picks about one validation customer
    few = len(node.split.validation_users(one))
    assert 0 < few < test_customers
    floor = NodePolicy(min_exact_customers=few + 1)
    answer = evaluate_node(node, exact, state, floor, valid_fraction=one)
    assert answer["customers"] == test_customers and "ndcg@10" in answer  # enough of them
    assert not any(k.startswith("valid-") for k in answer)  # too few: left out
    answer = evaluate_node(node, exact, state, NodePolicy(), valid_fraction=one)
    assert answer["valid-customers"] == few and "valid-ndcg@10" in answer  # no floor
    everything = NodePolicy(min_exact_customers=test_customers + 1)
    answer = evaluate_node(node, exact, state, everything, valid_fraction=1.0)
    assert set(answer) == {"node"}  # nothing exact about fewer than the floor


def test_private_sums_have_the_calibrated_noise() -> None:
    values = np.zeros((10, 3))
    draws = np.stack([private_sums(values, 10.0) for _ in range(400)])
    # each column: N(0, 10^2) on the scaled sum, scaled back by sqrt(3)
    assert draws.std() == pytest.approx(10.0 * np.sqrt(3), rel=0.1)
    assert abs(draws.mean()) < 2.0


# --- end to end: the policy in a federation ------------------------------------------------


def simulate(data: Path, out: Path, *extra: str) -> int:
    return main(
        ["simulate", "--data", str(data), "--out", str(out), "--clients", "2", *TINY, *extra]
    )


def ledger_kinds(out: Path) -> list[str]:
    return [e["kind"] for e in read_ledger(out / "ledger.jsonl")]


POLICY = ["--node-config", "require-dp=true max-epsilon=4", "--rounds", "1"]


@pytest.mark.e2e
class TestRefusedRun:
    """One refused request end to end (each policy's reasons are the unit tests' above): a
    test group of its own. A request within the same policy trains in the private federation
    of tests/simulations/test_federation.py::TestPrivateRun."""

    def test_nodes_refuse_what_their_policy_forbids(
        self, tiny_synth_dataset_dir: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "eps8"
        assert simulate(tiny_synth_dataset_dir, out, *POLICY, "--dp", "--target-epsilon", "8") == 0
        ledger = read_ledger(out / "ledger.jsonl")
        refused = [e for e in ledger if e["kind"] == "refused"]
        assert len(refused) == 2 and "contribution" not in ledger_kinds(out)
        assert all("max-epsilon=4" in e["reason"] for e in refused)
        assert "no node could train" in ledger[-1]["reason"]
        assert not (out / "partitions" / "node-0" / "privacy" / "accountant.json").exists()


def test_max_rounds_bounds_the_private_plan_a_node_calibrates_for() -> None:
    """A node calibrates its noise for the whole plan at once, and the accountant's memory grows
    with the planned steps: an operator asking for thousands of rounds must get a refusal,
    never a node that runs out of memory."""
    policy = NodePolicy(max_rounds=20)
    assert policy.refusal(RunConfig(dp=True, dp_rounds=20), CUSTOMERS) is None
    reason = policy.refusal(RunConfig(dp=True, dp_rounds=10_000), CUSTOMERS)
    assert reason is not None and "plans 10000 private rounds" in reason
    assert "max-rounds=20" in reason
    encoder = RunConfig(dp=True, dp_rounds=18, text_finetune_layers=1, text_finetune_rounds=3)
    assert "plans 21 private rounds" in policy.refusal(encoder, CUSTOMERS)
    # evaluating calibrates too
    assert policy.refusal(encoder, CUSTOMERS, training=False) is not None
    assert policy.refusal(RunConfig(dp_rounds=10_000), CUSTOMERS) is None  # nothing to calibrate


def test_max_steps_bounds_the_steps_a_tiny_batch_would_plan() -> None:
    """A batch of one multiplies the planned DP-SGD steps (and the calibration's memory) by
    the node's size without asking for a single extra round: the node counts the steps of its
    whole plan, the encoder rounds' included, and refuses above its max-steps."""
    request = RunConfig(dp=True, dp_rounds=6, dp_local_epochs=3, dp_batch_size=512)
    assert planned_steps(request, 2_236) == 5 * 3 * 6  # 1/q = 2236/512 rounds up to 5
    policy = NodePolicy(max_steps=10_000)
    assert policy.refusal(request, 2_236) is None
    tiny = RunConfig(dp=True, dp_rounds=6, dp_local_epochs=3, dp_batch_size=1)
    assert planned_steps(tiny, 2_236) == 2_236 * 3 * 6
    reason = policy.refusal(tiny, 2_236)
    assert reason is not None and "plans 40248 DP-SGD steps" in reason
    assert "max-steps=10000" in reason and "dp-batch-size 1" in reason
    assert policy.refusal(tiny, 2_236, training=False) is not None  # evaluating calibrates too
    assert policy.refusal(tiny, 500) is None  # a small node plans fewer: 9,000
    encoder = RunConfig(dp=True, text_finetune_layers=1, text_finetune_rounds=3, dp_encoder_batch=1)
    assert planned_steps(encoder, 2_236) == planned_steps(RunConfig(dp=True), 2_236) + 3 * 2_236
    assert NodePolicy().refusal(tiny, 2_236) is None  # a simulated node: no cap
    assert NodePolicy(max_steps=10_000).refusal(RunConfig(dp_batch_size=1), 2_236) is None


def test_evaluations_too_exact_for_the_budget_are_refused_before_anything_is_spent(
    node_setup,
) -> None:
    """A small eval-noise-multiplier within the range the server accounts can still make the
    evaluations alone spend more than the budget, so that no DP-SGD noise could meet it: the
    node refuses (the server ledgers a refusal) instead of failing its calibration."""
    node, config, state = node_setup
    exact = RunConfig(**{**config.to_dict(), "federated_eval": True, "eval_noise_multiplier": 1e-2})
    for reason in (
        NodePolicy().refusal(exact, CUSTOMERS),
        NodePolicy().refusal(exact, CUSTOMERS, training=False),
        train_node(node, exact, state, server_round=1)["reason"],
        evaluate_node(node, exact, state)["reason"],
    ):
        assert "alone spend more than" in reason
        assert f"epsilon {config.target_epsilon:g} at delta" in reason
    assert not NodePrivacy(node.directory).path.exists()  # nothing spent, nothing written
    noisy = RunConfig(**{**config.to_dict(), "federated_eval": True})  # the default noise: 10
    assert NodePolicy().refusal(noisy, CUSTOMERS) is None
    assert NodePolicy().refusal(RunConfig(dp=True, eval_noise_multiplier=1e-2), CUSTOMERS) is None


def test_evaluations_cannot_spend_more_than_the_nodes_answer_share(node_setup) -> None:
    """An operator who kept asking a node to evaluate drained its lifetime budget, each
    answer charged, until it could no longer train. A node's private answers together spend
    at most its max-answer-share of its max-epsilon: past it an evaluation is refused and
    nothing is charged, and the rest of the budget still trains."""
    node, config, state = node_setup
    policy = NodePolicy(max_epsilon=4.0, max_answer_share=0.25)
    request = RunConfig(**{**config.to_dict(), "eval_noise_multiplier": 8.0, "dp_guard": False})
    answers = [evaluate_node(node, request, state, policy=policy) for _ in range(40)]
    refused = [a for a in answers if a.get("refused")]
    given = len(answers) - len(refused)
    assert 3 <= given < 40 and all("mechanism" in a for a in answers[:given])
    assert "max-answer-share=0.25 of max-epsilon=4" in refused[0]["reason"]
    privacy = NodePrivacy(node.directory)
    assert privacy.state["contributions"] == given and privacy.answers() == ((8.0, given),)
    spent = answers[given - 1]["epsilon"]
    assert spent <= 1.0 * 1.02  # within the share (the closed form; PRV within its 2%)
    trained = train_node(node, request, state, server_round=1, policy=policy)
    assert trained["purpose"] == "training" and spent < trained["epsilon"] <= 4.0
    # a request whose planned answers alone pass the share is refused before anything
    eager = RunConfig(**{**request.to_dict(), "federated_eval": True, "dp_rounds": 20})
    assert "max-answer-share" in policy.refusal(eager, CUSTOMERS)
    assert NodePolicy(max_epsilon=4.0).refusal(eager, CUSTOMERS) is None  # no share: no cap
    with pytest.raises(PolicyError, match="max-answer-share"):
        parse_node_config("max-answer-share=1.5")


def test_the_closed_form_for_evaluations_agrees_with_the_prv_accountant() -> None:
    """Six Gaussian releases at sigma 1: the closed form's verdict flips where Opacus's PRV
    accountant puts their epsilon (within its 2% discretisation)."""
    delta = 1e-5
    epsilon = planned_epsilon(1.0, delta, 1.0, 6)
    assert releases_exceed(((1.0, 6),), epsilon * 0.98, delta)
    assert not releases_exceed(((1.0, 6),), epsilon * 1.02, delta)
    # six at sigma 2 and one at 2 / sqrt(18) compose into one at 1 / sqrt(1.5 + 4.5) = 1 / sqrt(6)
    assert releases_exceed(((2.0, 6), (2 / 18**0.5, 1)), epsilon * 0.98, delta)
    assert not releases_exceed(((2.0, 6), (2 / 18**0.5, 1)), epsilon * 1.02, delta)


@pytest.mark.parametrize(
    "setting, value, words",
    [
        ("max_grad_norm", 1e-37, "max-grad-norm"),  # its noise would flush to zero in float32
        ("max_grad_norm", 1e6, "max-grad-norm"),
        ("max_grad_norm", math.nan, "max-grad-norm"),
        ("dp_lr", math.nan, "dp-lr"),
        ("dp_lr", 0.0, "dp-lr"),
        ("dp_lr", math.inf, "dp-lr"),
    ],
)
def test_a_clipping_norm_or_step_a_node_cannot_add_noise_to_is_refused(
    setting: str, value: float, words: str
) -> None:
    """A max-grad-norm of 1e-37 put the noise's std (sigma x the norm) among float32's
    denormals, which the node flushes to zero: some coordinates left with no noise, and a
    dp-lr of 1e37 scaled the clipped signal back up."""
    request = unchecked(RunConfig(dp=True), **{setting: value})
    reason = NodePolicy().refusal(request, CUSTOMERS)
    assert reason is not None and words in reason
    assert NodePolicy().refusal(RunConfig(dp=True), CUSTOMERS) is None


def test_under_node_level_dp_a_node_states_its_public_figure(node_setup) -> None:
    """Its weight in the mean went out as its exact customer count."""
    node, config, state = node_setup
    request = RunConfig(**{**config.to_dict(), "dp": False, "node_dp": True})
    report = train_node(node, request, state, server_round=1)
    assert report["customers"] == NodeInfo.read(node.directory).customers
