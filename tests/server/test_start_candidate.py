"""A deployment's safety net (server/federation/rounds.py): where the nodes validate the rounds,
they evaluate the public start too, as round 0, and a run whose rounds were all wrecked ships
the start; a liar's validation answers cannot choose the round (server/federation/validation.py;
issue 15: no node may be able to wreck the model)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from helpers import node_reply
from safetensors.torch import load_file

from server.federation.registry import write_registry
from server.federation.rounds import run_federation
from shared.federation.wire import encode, trainable_state
from shared.recommender.experiment import Catalog
from shared.runs.config import RunConfig

ITEMS = pd.DataFrame({"item_id": [f"p{i}" for i in range(8)], "title": [f"t{i}" for i in range(8)]})
for column in ("categories", "brand", "description"):  # what the catalog's text reads
    ITEMS[column] = ""
NODES = {1: "a", 2: "bb", 3: "ccc"}  # Flower node id -> name (node_reply's id: its length)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch) -> None:  # noqa: ANN001
    """Flower's message identity, which a ServerApp's process is given."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


class DeployedNodes:
    """Three nodes as a deployment's grid reaches them: each trains (an update the server
    accepts) and answers every evaluation with ``valid(round, node)`` as its validation (and
    test) NDCG@10 and HR@10 over its 50 customers (or the number ``claims`` names for it); the
    rounds asked are kept."""

    def __init__(self, start: dict[str, torch.Tensor], valid, claims: dict) -> None:  # noqa: ANN001
        self.update = encode({k: v + 0.01 for k, v in start.items()})
        self.valid, self.claims = valid, claims
        self.asked: list[tuple[str, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages: list[Message], timeout=None) -> list[Message]:  # noqa: ANN001
        replies = []
        for message in messages:
            kind, name = message.metadata.message_type, NODES[message.metadata.dst_node_id]
            server_round = message.content["config"]["server-round"]
            self.asked.append((kind, server_round))
            if kind == "train":
                replies.append(node_reply(name, self.update, 50))
                continue
            score = self.valid(server_round, name)
            metrics = {"customers": 50, "hr@10": score, "ndcg@10": score}
            customers = self.claims.get(name, 50)
            metrics |= {"valid-customers": customers, "valid-hr@10": score, "valid-ndcg@10": score}
            replies.append(node_reply(name, None, metrics=metrics))
        return replies


def deploy(
    out: Path,
    valid,  # noqa: ANN001
    claims: dict | None = None,
    registered: int | None = None,
) -> tuple[dict, DeployedNodes, dict[str, torch.Tensor]]:
    """A deployment's run (the server holds the catalog alone; the nodes validate) of 3 rounds
    over :class:`DeployedNodes` (with a registry declaring ``registered`` customers for each,
    a tenth of which validate, where given); returns its metrics, the grid and the start."""
    settings = {}
    if registered is not None:
        out.mkdir(parents=True)
        nodes = {i: {"name": n, "catalog": None, "customers": registered} for i, n in NODES.items()}
        write_registry(out / "registry.json", nodes)
        settings = {"registry": str(out / "registry.json"), "valid_customers": registered * 3 // 10}
    config = RunConfig(
        dim=8, layers=1, max_len=5, catalog_epochs=0, federated_eval=True, rounds=3,
        round_patience=0, device="cpu", **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    catalog = Catalog(ITEMS, torch.randn(len(ITEMS), 8), config, "minilm", "tiny")
    start = trainable_state(catalog.new_model())
    grid = DeployedNodes(start, valid, claims or {})
    metrics = run_federation(grid, config, out, catalog, show_progress=False)
    return metrics, grid, start


def test_a_deployment_whose_rounds_are_all_wrecked_ships_the_start(tmp_path: Path) -> None:
    """Every node validates the start at 0.10 and every round below it (0.02, 0.03, 0.01): the
    nodes were asked to evaluate round 0, it is the best round, and the model shipped holds
    the start's weights. Before, a deployment's nodes never evaluated the start (its nodes
    refused a round below 1) and the best of the wrecked rounds was shipped."""
    wrecked = {0: 0.10, 1: 0.02, 2: 0.03, 3: 0.01}
    metrics, grid, start = deploy(tmp_path / "run", lambda r, node: wrecked[r])
    selection = metrics["selection"]
    assert selection["best_round"] == 0 and selection["rounds_run"] == 3
    assert grid.asked.index(("evaluate", 0)) == 0  # before the first round
    assert selection["start"]["ndcg@10"] == pytest.approx(0.10)
    shipped = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for name, value in start.items():
        assert torch.equal(shipped[name], value), name


def test_a_deployment_keeps_its_best_round_over_the_start(tmp_path: Path) -> None:
    """Where a round beats the start, that round is kept, as before."""
    improving = {0: 0.05, 1: 0.06, 2: 0.08, 3: 0.07}
    metrics, _, start = deploy(tmp_path / "run", lambda r, node: improving[r])
    assert metrics["selection"]["best_round"] == 2
    shipped = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert not torch.equal(shipped["id_scores.bias"], start["id_scores.bias"])


def test_a_liar_at_the_weight_cap_cannot_choose_a_deployments_round(tmp_path: Path) -> None:
    """Two honest nodes see round 1 gain 0.02 over the start and rounds 2 and 3 lose; the third
    claims 10^9 validation customers (held to row-clip 1.5 x the median node's: 75 of 175) and
    answers 1.0 for round 3 alone. The customer-weighted mean kept round 3 (0.46 against
    0.12); the median of the nodes' gains over the start keeps round 1."""
    honest = {0: 0.10, 1: 0.12, 2: 0.07, 3: 0.05}
    liar = {0: 0.10, 1: 0.0, 2: 0.0, 3: 1.0}

    def valid(server_round: int, node: str) -> float:
        return (liar if node == "ccc" else honest)[server_round]

    metrics, _, _ = deploy(tmp_path / "run", valid, {"ccc": 1e9})
    assert metrics["selection"]["best_round"] == 1
    rounds = {h["round"]: h for h in metrics["rounds"]}
    mean = {r: h["federated"]["valid"]["ndcg@10"] for r, h in rounds.items()}
    assert max(mean, key=mean.get) == 3  # what the mean would have kept
    assert rounds[1]["selection"]["ndcg@10"] == pytest.approx(0.10 + 0.02)
    assert rounds[3]["selection"]["ndcg@10"] == pytest.approx(0.10 - 0.05)
    assert rounds[3]["selection"]["users"] == 175


def test_a_registered_nodes_validation_answer_weighs_what_the_server_expects_of_it(
    tmp_path: Path,
) -> None:
    """Three nodes registered with 500 customers each, a tenth of which validate: an honest
    node answers for about 50. The third claims its whole registered 500: it is held to the 50
    the server expects of it (before: to 1.5 x the median, 75, of the 500 the registry lets it
    claim), so the round's answers speak for 150."""
    honest = {0: 0.10, 1: 0.12, 2: 0.07, 3: 0.05}
    metrics, _, _ = deploy(tmp_path / "run", lambda r, node: honest[r], {"ccc": 500}, 500)
    rounds = {h["round"]: h for h in metrics["rounds"]}
    assert rounds[1]["selection"]["users"] == rounds[1]["federated"]["valid"]["users"] == 150
    assert metrics["selection"]["best_round"] == 1
