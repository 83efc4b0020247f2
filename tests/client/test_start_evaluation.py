"""A node evaluates the public start as round 0 (client/client_app.py, client/request.py): a
deployment's nodes validate it as a candidate round, so that a run whose rounds were all
wrecked keeps it (server/federation/rounds.py). Under DP the answer is charged and signed
exactly as any other round's evaluation; no other request may name round 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import TEST_DEVICE, TINY_SETTINGS

from client.client_app import app
from client.node import load_node
from server.federation.settings import settings_record
from shared.federation.reports import parse_report
from shared.federation.wire import encode, trainable_state
from shared.recommender.model import FusionRecommender
from shared.runs.config import RunConfig
from tests.client.test_wire_privacy import accountant_state, deployed_context


@pytest.fixture
def ask(node_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch):  # noqa: ANN201
    """``ask(kind, round, dp)``: a deployed node's reply to a request of ``kind`` for
    ``round`` (the node's own copy of the data, its accountant empty at first)."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    node = shutil.copytree(node_dir, tmp_path / "node")
    shutil.rmtree(node / "privacy", ignore_errors=True)

    def reply(kind: str, server_round: int, dp: bool = True) -> Message:
        config = RunConfig(
            **TINY_SETTINGS, device=TEST_DEVICE, dp=dp, text_model=str(tiny_bert_dir)
        )
        data = load_node(str(node), config.text_model)
        model = FusionRecommender(
            config.model_config(len(data.text), data.text.shape[1]), data.text
        )
        arrays = ArrayRecord({k: Array(v) for k, v in encode(trainable_state(model)).items()})
        settings = settings_record(config, config.target_epsilon, data.catalog_digest, node.parent)
        settings["run-id"], settings["server-round"] = "c" * 64, server_round
        settings["valid-fraction"] = 0.0 if dp else 1.0  # without DP validation chooses rounds
        content = RecordDict({"arrays": arrays, "start": arrays, "config": settings})
        message = Message(content, dst_node_id=1, message_type=kind)
        context = deployed_context(node, tiny_bert_dir)
        context.node_config["require-dp"] = dp  # a deployed node asks for DP unless told
        return app(message, context)

    reply.node = node
    return reply


def _charged(node: Path) -> dict:
    """The node's accountant state."""
    return json.loads((node / "privacy" / "accountant.json").read_text())


def test_a_node_answers_the_starts_evaluation_as_round_0_without_dp(ask) -> None:
    reply = ask("evaluate", 0, dp=False)
    privacy, metrics = reply.content["privacy"], reply.content["metrics"]
    assert privacy["refused"] is False, privacy.get("reason")
    assert "valid-ndcg@10" in metrics and "ndcg@10" in metrics
    assert accountant_state(ask.node) is None  # nothing private, nothing charged


def test_the_starts_private_evaluation_is_charged_and_signed_as_any_rounds(ask) -> None:
    """Under DP round 0's answer is a release like round 1's: the same event charged to the
    node's accountant (one more contribution, one more private answer) before it leaves,
    signed for round 0; after round 1 it comes too late and is refused, nothing spent."""
    start = parse_report(dict(ask("evaluate", 0).content["privacy"]))
    after_start = _charged(ask.node)
    first = parse_report(dict(ask("evaluate", 1).content["privacy"]))
    after_first = _charged(ask.node)
    assert (start.release.round, first.release.round) == (0, 1)
    assert start.release.purpose == first.release.purpose == "evaluation"
    assert (start.release.contribution_index, first.release.contribution_index) == (0, 1)
    history = after_first["accountant"]["history"]
    assert after_start["accountant"]["history"] == history[:1] and history[0] == history[1]
    assert after_start["answers"] == [[history[0][0], 1]] and after_first["answers"][0][1] == 2
    assert first.release.epsilon > start.release.epsilon > 0
    before = accountant_state(ask.node)
    late = ask("evaluate", 0).content["privacy"]
    assert late["refused"] is True and "round 0 comes after" in late["reason"]
    assert accountant_state(ask.node) == before


@pytest.mark.parametrize("kind", ["train", "evaluate.guard"])
def test_no_other_request_may_name_round_0(ask, kind: str) -> None:
    privacy = ask(kind, 0).content["privacy"]
    assert (
        privacy["refused"] is True
        and "server-round must be a whole number >= 1, got 0" in (privacy["reason"])
    )
    assert accountant_state(ask.node) is None
