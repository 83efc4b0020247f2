"""End to end: ``fedrec simulate`` on Flower's simulation engine (server/federation/rounds.py,
client/node.py, client/client_app.py), its outputs, resuming after a crash, the
privacy ledger of a DP run, and a node that declines once its budget is spent.

The expensive file: three small federations (2 nodes, tiny model), each run once per session
(a test class each, on a worker each).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEST_DEVICE, TINY

from client.accountant import NodePrivacy
from client.node import load_node, train_node, training_histories
from server.federation.rounds import Checkpoint
from server.privacy.ledger import read_ledger, verify_chain
from shared.data.dataset import leave_one_out, load_dataset
from shared.data.partition import write_partitions
from shared.federation.node_directory import node_name
from shared.federation.wire import ITEM_TABLES, trainable_state
from shared.recommender.artifacts import load_model, read_item_ids
from shared.recommender.metrics import METRICS, TOP_K, evaluate, metrics_from_recs
from shared.recommender.model import FusionRecommender
from shared.recommender.text import embed_items
from shared.runs.config import RunConfig
from simulations.baselines import popularity
from simulations.cli import main

CONTRIBUTION_FIELDS = (
    "round",
    "node",
    "mechanism",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "epsilon",
    "accountant",
    "unit",
)
TARGET = 3.0


def simulate(data: Path, out: Path, *extra: str) -> None:
    assert (
        main(["simulate", "--data", str(data), "--out", str(out), "--clients", "2", *TINY, *extra])
        == 0
    )


# the run the tests of outputs, resuming and federated evaluation share (one simulation)
RESUMED = ("--rounds", "2", "--set", "federated-eval=true", "--set", "valid-customers=40")


@pytest.fixture(scope="module")
def resumed_run(tiny_synth_dataset_dir: Path, tmp_path_factory) -> dict:
    """A 2-round run evaluated at the nodes too, a copy of its outputs, then a crash after
    round 1 and the resumed run."""
    out = tmp_path_factory.mktemp("federated") / "run"
    simulate(tiny_synth_dataset_dir, out, *RESUMED)
    first = tmp_path_factory.mktemp("first") / "run"
    shutil.copytree(out, first, ignore=shutil.ignore_patterns("partitions"))
    # a crash during round 2: no metrics.json yet, and the last checkpoint is round 1's
    (out / "metrics.json").unlink()
    checkpoint = Checkpoint(out / "checkpoint.safetensors")
    state, optimizer, progress = checkpoint.load()
    checkpoint.save(state, optimizer, {**progress, "round": 1, "history": progress["history"][:1]})
    simulate(tiny_synth_dataset_dir, out, *RESUMED)
    return {"first": first, "resumed": out, "data": tiny_synth_dataset_dir}


class TestResumedRun:
    """One run's outputs, its crash and resumption, and its federated evaluation."""

    @pytest.mark.e2e
    def test_simulate_writes_every_output(self, resumed_run: dict) -> None:
        out, data = resumed_run["first"], resumed_run["data"]
        metrics = json.loads((out / "metrics.json").read_text())
        for stage in ("test", "valid"):
            assert set(METRICS) <= set(metrics[stage]), stage
            assert all(0.0 <= metrics[stage][m] <= 1.0 for m in METRICS)
        assert metrics["config"]["clients"] == 2 and metrics["config"]["rounds"] == 2
        assert "privacy" not in metrics  # no DP, no privacy claim
        assert [h["round"] for h in metrics["rounds"]] == [1, 2]
        assert all(h["nodes"] == 2 and h["rejected"] == [] for h in metrics["rounds"])

        dataset = load_dataset(data)
        split = leave_one_out(dataset)
        item_ids = dataset.items["item_id"].to_numpy()
        recs = pd.read_csv(out / "recs.csv", dtype={"user_id": str, "item_id": str})
        assert list(recs.columns) == ["user_id", "rank", "item_id"]
        assert len(recs) == TOP_K * len(split.test_users)
        assert set(recs["user_id"]) == set(split.user_ids[split.test_users])
        assert (
            recs.groupby("user_id")["rank"].apply(sorted).map(tuple) == tuple(range(1, TOP_K + 1))
        ).all()
        assert metrics_from_recs(out / "recs.csv", split, item_ids) == {
            m: metrics["test"][m] for m in METRICS
        }

        model_dir = out / "model"
        for name in ("model.safetensors", "config.json", "README.md"):
            assert (model_dir / name).stat().st_size > 0, name
        card = (model_dir / "README.md").read_text()
        assert (
            "WITHOUT differential privacy" in card and f"{metrics['test']['ndcg@10']:.4f}" in card
        )
        assert read_item_ids(model_dir) == item_ids.tolist()
        # the saved model is the evaluated one: it reproduces the test metrics
        text = torch.from_numpy(embed_items(dataset.items, show_progress=False))
        model = load_model(model_dir, text)

        def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
            return model.scores(model.user_states(histories))

        again, _ = evaluate(score, split, "test")
        assert {m: again[m] for m in METRICS} == pytest.approx(
            {m: metrics["test"][m] for m in METRICS}, abs=1e-9
        )

        # validation chose the round: the global model is the best round's, not the last one's
        chosen = metrics["selection"]
        # (round 0, the starting model, is a candidate too)
        scores = [chosen["start"]["ndcg@10"]] + [
            h["selection"]["ndcg@10"] for h in metrics["rounds"]
        ]
        assert chosen["best_round"] == int(np.argmax(scores)) and chosen["rounds_run"] == 2
        # then the popularity prior's weights (0: the best round as it is)
        assert metrics["popularity_prior"]["tried"][0]["valid_ndcg@10"] == max(scores)
        best, _, _ = Checkpoint(out / "best.safetensors").load()
        saved = {k: v for k, v in model.state_dict().items() if k in best}
        for name in best.keys() - ITEM_TABLES.keys():  # item rows nobody trained get text vectors
            assert torch.equal(saved[name], best[name]), name

        # the tiny data's histories are long: the server told no node to learn them backwards
        assert all(h["reversed_histories"] == 0 for h in metrics["rounds"])
        assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Checkpoint(out / "checkpoint.safetensors").load()[2]["round"] == 2
        ledger = read_ledger(out / "ledger.jsonl")
        assert verify_chain(ledger) == []
        assert [e["kind"] for e in ledger] == ["run_start", "run_end"]

    @pytest.mark.e2e
    def test_validation_adds_the_nodes_popularity_to_the_kept_model(
        self, resumed_run: dict
    ) -> None:
        """Issue 16: a federation's server holds no counts, and its model stayed far below
        popularity where popularity is the signal. Without DP each node now sends how many of
        its training histories hold each product, the server sums them, and the validation
        that chose the round chooses the prior's weight: the kept model validates at least as
        well as popularity on the same customers, less its tie-breaking."""
        out, data = resumed_run["first"], resumed_run["data"]
        metrics = json.loads((out / "metrics.json").read_text())
        prior = metrics["popularity_prior"]
        assert prior["nodes"] == 2 and len(prior["tried"]) >= 6
        assert metrics["valid"]["ndcg@10"] == max(t["valid_ndcg@10"] for t in prior["tried"])
        split = leave_one_out(load_dataset(data))
        validating = split.validation_users(metrics["selection"]["valid_fraction"])
        popular = popularity(split.training_histories(), split.num_items)
        baseline, _ = evaluate(popular, split, "valid", users=validating)
        assert metrics["valid"]["ndcg@10"] >= baseline["ndcg@10"] - 0.01

    @pytest.mark.e2e
    def test_a_crashed_run_resumes_after_its_last_checkpoint(self, resumed_run: dict) -> None:
        out, first = resumed_run["resumed"], resumed_run["first"]
        metrics = json.loads((out / "metrics.json").read_text())
        original = json.loads((first / "metrics.json").read_text())
        assert [h["round"] for h in metrics["rounds"]] == [1, 2]  # each round exactly once
        assert metrics["rounds"][0] == original["rounds"][0]  # round 1 was not run again
        assert Checkpoint(out / "checkpoint.safetensors").load()[2]["round"] == 2
        ledger = read_ledger(out / "ledger.jsonl")
        assert verify_chain(ledger) == []
        kinds = [e["kind"] for e in ledger]
        assert kinds.count("run_start") == 1
        assert kinds == ["run_start", "run_end", "run_end"]  # the first run's end, then the resumed
        assert (out / "recs.csv").exists() and set(METRICS) <= set(metrics["test"])

    @pytest.mark.e2e
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    def test_a_changed_config_is_refused_in_the_same_out(self, resumed_run: dict, capsys) -> None:
        out = resumed_run["resumed"]
        before = {name: (out / name).read_bytes() for name in ("ledger.jsonl", "metrics.json")}
        capsys.readouterr()
        try:
            code = main(
                [
                    "simulate",
                    "--data",
                    str(resumed_run["data"]),
                    "--out",
                    str(out),
                    "--clients",
                    "2",
                    *RESUMED,
                    *TINY,
                    "--set",
                    "lr=0.01",
                ]
            )
        except SystemExit as stopped:
            code = stopped.code
        # nothing of the earlier run is touched
        assert {name: (out / name).read_bytes() for name in before} == before
        # and the refusal is reported as a failure, with its reason
        assert code not in (0, None)
        printed = capsys.readouterr()
        assert "other settings" in printed.out + printed.err + str(code)

    @pytest.mark.e2e
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    def test_a_checkpoint_whose_ledger_was_removed_or_cut_is_not_resumed(
        self, resumed_run: dict
    ) -> None:
        out = resumed_run["resumed"]  # in place (OUT is in the settings), restored at the end
        ledger, metrics = out / "ledger.jsonl", out / "metrics.json"
        kept = {path: path.read_bytes() for path in (ledger, metrics)}
        metrics.unlink()  # a crash in the last round
        try:
            for cut in ("removed", "cut"):
                if cut == "removed":
                    ledger.unlink()
                else:  # only the run_start left: the chain alone cannot tell
                    ledger.write_bytes(kept[ledger].split(b"\n")[0] + b"\n")
                before = ledger.read_bytes() if ledger.exists() else None
                try:
                    code = main(
                        ["simulate", "--data", str(resumed_run["data"]), "--out", str(out)]
                        + ["--clients", "2", *RESUMED, *TINY]
                    )
                except SystemExit as stopped:
                    code = stopped.code
                assert "under-report" in str(code), cut
                assert (ledger.read_bytes() if ledger.exists() else None) == before, cut
        finally:
            for path, data in kept.items():
                path.write_bytes(data)

    @pytest.mark.e2e
    def test_nodes_evaluate_on_events_they_held_out(self, resumed_run: dict) -> None:
        """With federated evaluation, each node holds out its customers' last events from its own
        training; on a regional partition (whole customers per node) those are exactly the server's
        test events, so the nodes' aggregate equals the server's evaluation of the same model."""
        out = resumed_run["first"]
        metrics = json.loads((out / "metrics.json").read_text())
        server, nodes = metrics["rounds"][0]["test"], metrics["federated_evaluation"][0]
        assert nodes["customers"] == metrics["test"]["users"] and not nodes["dp"]
        for name in ("hr@10", "ndcg@10"):
            assert nodes[name] == pytest.approx(server[name], abs=1e-9), name
        # the same holds for the validation customers, whose validation events choose the rounds:
        # the nodes pick them by id as the server does, and hold those events out too
        server_valid = metrics["rounds"][0]["selection"]
        assert 0 < nodes["valid"]["users"] == server_valid["users"] < metrics["test"]["users"]
        for name in ("hr@10", "ndcg@10"):
            assert nodes["valid"][name] == pytest.approx(server_valid[name], abs=1e-9), name
        # and no node trained on its held-out events: the partitions hold them, the nodes skip them
        partition = resumed_run["resumed"] / "partitions" / "node-0"  # (the copy leaves them out)
        node = load_node(str(partition), RunConfig().text_model)
        config = RunConfig(federated_eval=True)
        trained = training_histories(node, config)
        for user in np.flatnonzero(node.split.test_target >= 0)[:50]:
            assert len(trained[user]) == len(node.split.history(user, "test"))


# --- differential privacy -------------------------------------------------------------------


# the private run the tests of DP share (one simulation, started twice): 2 regional rounds under
# DP, asked within the nodes' own policy, whose private step is far too large (dp-lr 200) so that
# the rounds walk the model below its public start
POLICY = ("--node-config", "require-dp=true max-epsilon=4")
PRIVATE = (
    *("--rounds", "2", "--dp", "--target-epsilon", str(TARGET), *POLICY),
    # each tiny node's std 0.25 x sqrt(80) = 2.2: a loss of about 12 against a std of 3.2
    *("--set", "dp-guard-noise-scale=0.25", "--set", "dp-lr=200"),
)


@pytest.fixture(scope="module")
def private_run(tiny_synth_dataset_dir: Path, tmp_path_factory) -> Path:
    """The private run, then the same run started again (it asks nothing more); what each start
    left (metrics and the guard's ledger entries) is kept beside the run as ``starts.json``."""
    out = tmp_path_factory.mktemp("private") / "run"
    starts = []
    for _ in range(2):
        simulate(tiny_synth_dataset_dir, out, *PRIVATE)
        guards = [e for e in read_ledger(out / "ledger.jsonl") if e.get("purpose") == "guard"]
        starts.append({"metrics": json.loads((out / "metrics.json").read_text()), "guards": guards})
    (out.parent / "starts.json").write_text(json.dumps(starts))
    return out


class TestPrivateRun:
    """A regional federation under DP, within its nodes' policy, whose private rounds did harm:
    its ledger, accountants and guarantee, and the public start it ships."""

    @pytest.mark.e2e
    def test_dp_run_ledger_records_every_contribution(self, private_run: Path) -> None:
        ledger = read_ledger(private_run / "ledger.jsonl")
        assert verify_chain(ledger) == []
        contributions = [e for e in ledger if e["kind"] == "contribution"]
        nodes = {node_name(d) for d in (private_run / "partitions").iterdir()}
        assert nodes == {"regional-0", "regional-1"}
        training = [e for e in contributions if e["purpose"] == "training"]
        for server_round in (1, 2):  # one entry per node per round
            assert sorted(e["node"] for e in training if e["round"] == server_round) == sorted(
                nodes
            )
        # then each node's start-guard answer, in the last round
        guards = [(e["round"], e["node"]) for e in contributions if e["purpose"] == "guard"]
        assert sorted(guards) == [(2, node) for node in sorted(nodes)]
        assert len(contributions) == 6
        for entry in contributions:
            missing = [f for f in CONTRIBUTION_FIELDS if entry.get(f) in (None, "")]
            assert not missing, missing
            assert entry["accountant"] == "prv"
            assert 0 < entry["sample_rate"] <= 1 and entry["steps"] >= 1
            assert entry["noise_multiplier"] > 0 and entry["max_grad_norm"] == 1.0
            assert 0 < entry["epsilon"] <= TARGET + 1e-6
        for node in nodes:
            mine = [e for e in contributions if e["node"] == node]
            assert [e["contribution_index"] for e in mine] == [0, 1, 2]
            assert mine[0]["epsilon"] < mine[1]["epsilon"] < mine[2]["epsilon"]  # cumulative

    @pytest.mark.e2e
    def test_dp_run_accountant_files_match_the_ledger(self, private_run: Path) -> None:
        from opacus.accountants import PRVAccountant

        ledger = read_ledger(private_run / "ledger.jsonl")
        contributions = [e for e in ledger if e["kind"] == "contribution"]
        for directory in sorted((private_run / "partitions").iterdir()):
            assert (directory / "privacy" / "accountant.json").exists()
            mine = [e for e in contributions if e["node"] == node_name(directory)]
            last = mine[-1]
            privacy = NodePrivacy(directory)
            assert privacy.state["contributions"] == len(mine)
            assert privacy.epsilon_after(last["delta"]) == pytest.approx(last["epsilon"], rel=1e-9)
            # and the ledger alone recomputes it: a fresh PRV accountant over its entries
            accountant = PRVAccountant()
            accountant.history = [
                (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in mine
            ]
            assert accountant.get_epsilon(last["delta"]) == pytest.approx(last["epsilon"], rel=1e-3)

    @pytest.mark.e2e
    def test_dp_run_states_its_guarantee(self, private_run: Path) -> None:
        metrics = json.loads((private_run / "metrics.json").read_text())
        privacy = metrics["privacy"]
        assert privacy["unit"] and privacy["accountant"] and 0 < privacy["delta"] < 1
        assert 0 < privacy["epsilon"] <= TARGET + 1e-6
        assert set(privacy["per_node"]) == {"regional-0", "regional-1"}
        assert max(n["epsilon"] for n in privacy["per_node"].values()) == privacy["epsilon"]
        assert (
            "WITHOUT differential privacy" not in (private_run / "model" / "README.md").read_text()
        )
        assert main(["audit", str(private_run)]) == 0

    @pytest.mark.e2e
    def test_a_private_run_whose_rounds_did_harm_ships_its_public_start(
        self, private_run: Path
    ) -> None:
        """A private step far too large (dp-lr 200) walks the model below its public start: the
        nodes' guard answers say so, the run ships the start (its test NDCG@10 is the start's),
        each answer is in the ledger at the guard's noise, and the audit passes. Started again, the
        run keeps its verdict and asks nothing more."""
        starts = json.loads((private_run.parent / "starts.json").read_text())
        for start in starts:
            metrics, guards = start["metrics"], start["guards"]
            assert metrics["start_guard"]["shipped"] == "start"
            assert metrics["start_guard"]["nodes"] == 2
            assert metrics["test"]["ndcg@10"] == metrics["context"]["public_start"]["ndcg@10"]
            assert len(guards) == 2
            assert all(
                e["noise_multiplier"] == 0.25 * math.sqrt(e["num_customers"]) for e in guards
            )
        assert main(["audit", str(private_run)]) == 0

    @pytest.mark.e2e
    def test_nodes_train_within_their_policy(self, private_run: Path) -> None:
        """The nodes' policy (require-dp=true max-epsilon=4) admits a request within it: trained
        and audited (the refused request: tests/client/test_policy.py::TestRefusedRun)."""
        ledger = read_ledger(private_run / "ledger.jsonl")
        contributions = [e for e in ledger if e["kind"] == "contribution"]
        # each node: its rounds' training, then the start guard's comparison, within its budget
        assert [e["purpose"] for e in contributions] == ["training"] * 4 + ["guard"] * 2
        assert all(0 < e["epsilon"] <= 4 for e in contributions)
        assert main(["audit", str(private_run)]) == 0


@pytest.fixture(scope="module")
def merchant_run(tiny_synth_dataset_dir: Path, tmp_path_factory) -> Path:
    """Two merchants under DP, 2 rounds: the tests below read the same run."""
    out = tmp_path_factory.mktemp("merchant") / "run"
    extra = ["--partition", "merchant", "--rounds", "2", "--dp", "--target-epsilon", str(TARGET)]
    simulate(tiny_synth_dataset_dir, out, *extra)
    return out


class TestMerchantRun:
    """Two merchants under DP: their budget and its composition."""

    @pytest.mark.e2e
    def test_a_private_merchant_run_spends_the_budget_it_asked_within_its_target(
        self,
        merchant_run: Path,
    ) -> None:
        """Two merchants under DP: the run asks each for more than half the target (the largest
        budget whose composition over both plans keeps it), states it in its start, every node
        keeps it, the composition over both stays within the target, and the audit passes."""
        out = merchant_run
        ledger = read_ledger(out / "ledger.jsonl")
        asked = ledger[0]["budget_per_node"]
        assert TARGET / 2 < asked < TARGET
        contributions = [e for e in ledger if e["kind"] == "contribution"]
        assert {e["node"] for e in contributions} == {"merchant-0", "merchant-1"}
        assert all(e["target_epsilon"] == asked and e["epsilon"] <= asked for e in contributions)
        privacy = json.loads((out / "metrics.json").read_text())["privacy"]
        assert privacy["federation"]["applies"] == "all_nodes"
        assert max(e["epsilon"] for e in contributions) < privacy["epsilon"] <= TARGET
        assert main(["audit", str(out)]) == 0

    @pytest.mark.e2e
    def test_a_merchant_dp_federation_states_the_composition_over_its_nodes(
        self,
        merchant_run: Path,
    ) -> None:
        """The headline of a merchant federation is every release of every node composed (the
        audit of the same run is the test above's)."""
        import dp_accounting as dpa
        from dp_accounting.pld import pld_privacy_accountant

        out = merchant_run
        contributions = [
            e for e in read_ledger(out / "ledger.jsonl") if e["kind"] == "contribution"
        ]
        assert {e["node"] for e in contributions} == {"merchant-0", "merchant-1"}
        # an independent recomputation: every release of every node composed, at the nodes'
        # summed delta
        accountant = pld_privacy_accountant.PLDAccountant()
        for e in contributions:
            step = dpa.PoissonSampledDpEvent(
                e["sample_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])
            )
            accountant.compose(dpa.SelfComposedDpEvent(step, e["steps"]))
        deltas = {e["node"]: e["delta"] for e in contributions}
        composed = accountant.get_epsilon(sum(deltas.values()))
        privacy = json.loads((out / "metrics.json").read_text())["privacy"]
        assert privacy["epsilon"] >= composed * (1 - 1e-3)
        assert privacy["epsilon"] > max(e["epsilon"] for e in contributions)  # not the worst node
        assert privacy["epsilon"] <= TARGET + 1e-6  # the federation's budget holds


def test_a_node_whose_budget_is_spent_declines(
    tiny_synth_dataset_dir: Path, tmp_path: Path
) -> None:
    directory = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path, 2)[0]
    config = RunConfig(
        dp=True,
        target_epsilon=TARGET,
        dp_rounds=2,
        dim=16,
        layers=1,
        dp_dim=16,
        dp_max_len=10,
        dp_batch_size=40,
        device=TEST_DEVICE,
    )
    node = load_node(str(directory), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    privacy = NodePrivacy(directory)
    privacy.state = {
        "accountant": {"history": [[0.6, 0.5, 40]], "mechanism": "prv"},
        "contributions": 7,
        "noise_multiplier": 0.6,
    }
    privacy.save()
    saved = privacy.path.read_bytes()

    report = train_node(node, config, trainable_state(model), server_round=3)
    assert report["declined"] is True
    assert "budget" in report["reason"] and str(TARGET) in report["reason"]
    assert report["epsilon"] > TARGET  # what it has already spent, reported
    assert "state" not in report and "rows" not in report  # no weights leave the node
    assert privacy.path.read_bytes() == saved  # nothing spent, nothing written
