"""A federation that tunes the text encoder at its nodes first (server/federation/encoder_rounds.py,
client/encoder.py), on Flower's simulation engine."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import TEST_DEVICE, TINY, TINY_SETTINGS, cli_settings
from safetensors.torch import load_file, save, save_file
from transformers import AutoModel

from client import client_app
from client.node import load_node
from server.federation.aggregation import NodeUpdate
from server.federation.encoder_rounds import tune_encoder
from server.federation.exchange import RoundResult
from server.federation.resume import require_ledger
from server.federation.settings import settings_record
from server.federation.strategy import FedRecStrategy
from server.privacy.audit import audit
from server.privacy.ledger import PrivacyLedger, entry_hash, read_ledger
from shared.data.dataset import load_dataset
from shared.data.partition import cold_item_indices, write_partitions
from shared.recommender.artifacts import read_text_model
from shared.recommender.finetune import top_layers
from shared.recommender.text import TextEncoder
from shared.runs.config import RunConfig
from simulations.cli import main

COLD = 0.2  # products new to every node: scored from the tuned text alone


@pytest.fixture(scope="module")
def private_run(tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path_factory):
    """One federation (2 nodes, tiny model) that tunes the encoder in 2 private rounds first,
    a fifth of the products at no node: ``(its OUT, the command that ran it)``. Every check
    of a whole run below reads it (one Ray start-up for them all)."""
    out = tmp_path_factory.mktemp("encoder") / "run"
    settings = {
        "text_model": tiny_bert_dir,
        "text_finetune_layers": 1,
        "text_finetune_rounds": 2,
        "dp_encoder_batch": 20,
        "dp_rounds": 1,
        "cold_items": COLD,
    }
    command = ["simulate", "--data", str(tiny_synth_dataset_dir), "--out", str(out)]
    command += ["--clients", "2", "--dp", *TINY, *cli_settings(settings)]
    assert main(command) == 0
    return out, command


@pytest.mark.e2e
class TestPrivateEncoderRun:
    """The checks of one private federation (``private_run``): one test group, run apart from
    the unit tests below."""

    def test_private_encoder_rounds_are_signed_ledgered_and_audited(
        self, private_run, tmp_path: Path
    ) -> None:
        """Under --dp each node tunes the encoder with DP-SGD, every round's release is in the
        ledger (purpose encoder) before its layers are used, no loss leaves a node, and the
        independent audit recomputes the whole plan: encoder rounds, training and evaluations."""
        out, _ = private_run
        metrics = json.loads((out / "metrics.json").read_text())
        assert [(r["round"], r["nodes"]) for r in metrics["encoder_rounds"]] == [(1, 2), (2, 2)]
        assert all(r["loss"] is None for r in metrics["encoder_rounds"])  # not sent under DP
        entries = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
        contributions = [e for e in entries if e["kind"] == "contribution"]
        encoder = [e for e in contributions if e["purpose"] == "encoder"]
        assert sorted((e["round"], e["node"]) for e in encoder) == [
            (1, "regional-0"),
            (1, "regional-1"),
            (2, "regional-0"),
            (2, "regional-1"),
        ]
        for node in ("regional-0", "regional-1"):
            mine = [e for e in contributions if e["node"] == node]
            assert [e["contribution_index"] for e in mine] == list(range(len(mine)))
            assert [e["purpose"] for e in mine][:2] == ["encoder", "encoder"]
            dp_sgd = [e for e in mine if e["purpose"] in ("training", "encoder")]
            assert len({e["noise_multiplier"] for e in dp_sgd}) == 1  # one sigma for the whole plan
        assert main(["audit", str(out)]) == 0
        # the audit's own calibration check covers encoder releases: one that took more steps
        # than its plan, or one in a run whose plan tunes no encoder, is named
        for name, edit in {
            "steps": lambda e: (
                e.update(steps=e["steps"] + 1) if e.get("purpose") == "encoder" else 0
            ),
            "no plan": lambda e: (
                e["config"].update(text_finetune_layers=0) if e["kind"] == "run_start" else 0
            ),
        }.items():
            forged = tmp_path / name
            forged.mkdir()
            edited = read_ledger(out / "ledger.jsonl")
            for entry in edited:
                edit(entry)
            for i, entry in enumerate(edited):  # a forger with write access re-chains the hashes
                entry["prev_hash"] = edited[i - 1]["hash"] if i else "0" * 64
                entry["hash"] = entry_hash(entry)
            lines = [json.dumps(e) for e in edited]
            (forged / "ledger.jsonl").write_text("\n".join(lines) + "\n")
            report = audit(forged)
            (calibration,) = [c for c in report["checks"] if c["name"] == "calibration"]
            assert calibration["status"] == "fail"
            wanted = "steps" if name == "steps" else "tunes no encoder"
            assert any(wanted in problem for problem in calibration["problems"])

    def test_the_nodes_tune_the_encoder_and_the_model_ships_it(
        self, private_run, tiny_bert_dir: Path
    ) -> None:
        """Runs after test_private_encoder_rounds_are_signed_ledgered_and_audited (file order):
        its second run goes over the fixture's OUT."""
        out, command = private_run
        metrics = json.loads((out / "metrics.json").read_text())
        encoder_rounds = metrics["encoder_rounds"]
        assert [(r["round"], r["nodes"]) for r in encoder_rounds] == [(1, 2), (2, 2)]
        assert all(not r["rejected"] for r in encoder_rounds)
        # the released model carries the federation's encoder: base weights but the top layer
        encoder = Path(read_text_model(out / "model"))
        assert encoder == out / "model" / "text-encoder"
        assert json.loads((encoder / "finetune.json").read_text())["federated"] is True
        base = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
        tuned = AutoModel.from_pretrained(encoder).state_dict()
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        averaged = load_file(str(out / "text-encoder.safetensors"))
        assert changed and changed <= set(averaged)
        assert all(torch.equal(tuned[k], averaged[k]) for k in averaged)
        # a fifth of the products were at no node, and the test reports those customers apart
        test = metrics["test"]
        assert test["cold"]["users"] > 0 and test["warm"]["users"] > 0
        assert test["cold"]["users"] + test["warm"]["users"] == test["users"]
        for node in (out / "partitions").glob("node-*"):
            held = load_dataset(node).interactions["item_idx"]
            assert not held.isin(cold_item_indices(300, COLD, seed=0)).any()
        # a second run over the same OUT finds it complete: nothing is tuned again
        assert main(command) == 0
        assert json.loads((out / "metrics.json").read_text())["encoder_rounds"] == encoder_rounds


class ScriptedNodes:
    """A federation whose nodes answer every encoder round with ``answer(layers)``: the
    updates, and why other nodes gave none; each round leaves an entry in ``out``'s ledger,
    as the nodes' replies do."""

    def __init__(self, config: RunConfig, answer, out: Path):
        self.config, self.strategy, self.answer, self.rounds = (
            config,
            FedRecStrategy(config),
            answer,
            [],
        )
        self.ledger = PrivacyLedger(out / "ledger.jsonl")
        if not self.ledger.entries:
            self.ledger.append("run_start", config={"dp": False}, unit="customer")

    def train(self, server_round: int, state: dict, message_type: str) -> RoundResult:
        self.rounds.append((server_round, message_type))
        updates, rejected = self.answer(state)
        self.ledger.append("declined", round=server_round, node="n", reason="scripted")
        return RoundResult(updates, None, 4, len(updates), rejected, [])


def test_a_plain_encoder_round_keeps_the_loss_the_nodes_reply(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Without DP a node's encoder reply (client/client_app.py) says its contrastive loss,
    and the round's history keeps the mean of what the replies said (under DP no loss leaves
    a node: test_private_encoder_rounds_are_signed_ledgered_and_audited)."""
    for field in ("_run_id", "_node_id", "_task_id"):  # as in the process Flower starts
        monkeypatch.setattr(TaskIdentity, field, 1)
    node_dir = write_partitions(load_dataset(tiny_synth_dataset_dir), tmp_path / "parts", 2)[0]
    config = RunConfig(
        **TINY_SETTINGS,
        device=TEST_DEVICE,
        text_model=str(tiny_bert_dir),
        text_finetune_layers=1,
        text_finetune_steps=8,
        text_finetune_rounds=1,
        clients=2,
    )
    digest = load_node(str(node_dir), config.text_model).catalog_digest
    settings = settings_record(config, config.target_epsilon, digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    public = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    layers = ArrayRecord({k: Array(v.numpy()) for k, v in public.items()})
    node_config = {"data-dir": str(node_dir), "min-exact-customers": 1, "require-dp": False}
    context = Context(1, 1, {**node_config, "text-models": str(tiny_bert_dir)}, RecordDict(), {})
    records = RecordDict({"arrays": layers, "config": settings})
    message = Message(records, dst_node_id=1, message_type="train.encoder")
    reply = client_app.app(message, context)
    assert not reply.has_error(), reply.error
    assert "loss" in reply.content["metrics"], dict(reply.content["privacy"])
    loss = reply.content["metrics"]["loss"]
    assert loss > 0

    def answer(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        return FedRecStrategy(config).node_updates([reply], layers)

    class Replying(ScriptedNodes):
        def train(self, server_round: int, state: dict, message_type: str) -> RoundResult:
            result = super().train(server_round, state, message_type)
            return replace(result, replies=[reply])

    _, history = tune_encoder(Replying(config, answer, tmp_path), tmp_path, False)
    assert history[0]["nodes"] == 1 and history[0]["loss"] == pytest.approx(loss)


REFUSED = ["regional-0: this node's policy requires customer-level DP (require-dp=true)"]


def test_when_no_node_tunes_the_encoder_stays_public_and_the_stage_ends(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    config = RunConfig(text_model=str(tiny_bert_dir), text_finetune_layers=1, clients=2)
    federation = ScriptedNodes(config, lambda layers: ([], REFUSED), tmp_path)
    weights, history = tune_encoder(federation, tmp_path, show_progress=False)
    assert federation.rounds == [(1, "train.encoder")]  # no second round is asked for
    assert history == [{"round": 1, "nodes": 0, "rejected": REFUSED}]
    public = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    assert all(torch.equal(weights[k], public[k]) for k in public)


def test_a_run_stopped_between_encoder_rounds_goes_on_from_the_next(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A server stopped after encoder round 2 of 3 resumes at round 3 from round 2's layers:
    asking round 1 again would ask the nodes for a round older than one they charged, which
    they refuse (client/accountant.py), and the encoder would stay untuned."""
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=3
    )

    def moved(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        return [NodeUpdate("n", 10.0, {k: v + 0.01 for k, v in layers.items()})], []

    class Stopping(ScriptedNodes):
        def train(self, server_round: int, state: dict, message_type: str) -> RoundResult:
            if server_round == 3:
                raise KeyboardInterrupt  # the server stops during round 3
            return super().train(server_round, state, message_type)

    with pytest.raises(KeyboardInterrupt):
        tune_encoder(Stopping(config, moved, tmp_path), tmp_path, show_progress=False)
    after_two = load_file(str(tmp_path / "text-encoder.safetensors"))
    resumed = ScriptedNodes(config, moved, tmp_path)
    weights, history = tune_encoder(resumed, tmp_path, show_progress=False)
    assert resumed.rounds == [(3, "train.encoder")]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(torch.allclose(weights[k], after_two[k] + 0.01, atol=1e-4) for k in weights)
    again = ScriptedNodes(config, moved, tmp_path)  # complete: read back, nothing asked
    assert tune_encoder(again, tmp_path, show_progress=False)[1] == history
    assert again.rounds == []


@pytest.mark.parametrize("cut", ["removed", "cut", "replaced"])
def test_encoder_layers_whose_ledger_was_removed_or_cut_are_not_resumed(
    tiny_bert_dir: Path, tmp_path: Path, cut: str
) -> None:
    """The encoder rounds' file pins the ledger's last entry like the checkpoint: resumed
    after the ledger lost the rounds' entries, the run would reuse the tuned layers with
    their spending gone from the ledger (the checkpoint's pin alone missed it: there is no
    checkpoint before the model's first round)."""
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=2
    )

    def moved(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        return [NodeUpdate("n", 10.0, {k: v + 0.01 for k, v in layers.items()})], []

    tune_encoder(ScriptedNodes(config, moved, tmp_path), tmp_path, show_progress=False)
    require_ledger(tmp_path)  # the ledger as the rounds left it: resumed
    ledger = tmp_path / "ledger.jsonl"
    run_start = ledger.read_text().splitlines(keepends=True)[0]
    if cut == "removed":
        ledger.unlink()
    elif cut == "cut":  # only the run_start left: the chain alone cannot tell
        ledger.write_text(run_start)
    else:  # another run's ledger, as long
        ledger.unlink()
        other = ScriptedNodes(config, moved, tmp_path)
        other.train(1, {}, "train.encoder")
        other.train(2, {}, "train.encoder")
    with pytest.raises(SystemExit, match="text-encoder.safetensors after encoder round 2"):
        require_ledger(tmp_path)


def test_an_edited_encoder_ledger_pin_is_named_not_a_crash(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=1
    )
    tune_encoder(ScriptedNodes(config, lambda layers: ([], REFUSED), tmp_path), tmp_path, False)
    path = tmp_path / "text-encoder.safetensors"
    for pin in ("{not json", "[0, 1]", '{"seq": 0, "hash": "forged"}'):
        metadata = {"history": "[]", "complete": "true", "ledger": pin}
        save_file(load_file(str(path)), str(path), metadata=metadata)
        with pytest.raises(SystemExit, match="under-report"):
            require_ledger(tmp_path)


def test_the_encoder_rounds_file_is_fsynced_before_it_replaces_the_old(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run reads the layers back: renamed into place without an fsync, a power cut
    could leave it empty (the checkpoint and metrics.json were durable, it was not)."""
    synced: list[str] = []
    fsync = os.fsync

    def recorded(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=1
    )

    def moved(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        return [NodeUpdate("n", 10.0, {k: v + 0.01 for k, v in layers.items()})], []

    tune_encoder(ScriptedNodes(config, moved, tmp_path), tmp_path, show_progress=False)
    assert any(Path(p).name.startswith("text-encoder.safetensors") for p in synced), synced
    assert str(tmp_path) in synced  # the rename itself: the directory


def test_a_malicious_node_moves_the_encoder_no_more_than_the_row_bound_allows(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Three honest nodes move every tensor a little; a fourth sends a change 10,000 times
    larger and claims a million customers. Its change is scaled down to row-clip times the
    round's median before the mean, so no tensor moves more than that."""
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=1
    )

    def answer(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        honest = [
            NodeUpdate(f"regional-{i}", 100.0, {k: v + 0.01 for k, v in layers.items()})
            for i in range(3)
        ]
        wrecker = NodeUpdate("regional-3", 1e6, {k: v + 100.0 for k, v in layers.items()})
        return [*honest, wrecker], []

    public = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    weights, history = tune_encoder(
        ScriptedNodes(config, answer, tmp_path), tmp_path, show_progress=False
    )
    assert history[0]["clipped"] == {"regional-3": len(public)}  # every tensor it sent
    assert history[0]["loss"] is None  # no reply said: the round goes on all the same
    for name, value in public.items():
        honest_norm = torch.full_like(value, 0.01).norm()
        moved = (weights[name] - value).norm()
        assert moved <= config.row_clip * honest_norm * (1 + 1e-4), name


def test_an_encoder_aggregate_that_is_not_finite_is_never_applied_or_saved(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The model's rounds never applied a non-finite aggregate; the encoder's rounds saved it
    (every later text embedding NaN, read back on resume too)."""
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=1
    )

    def answer(layers: dict) -> tuple[list[NodeUpdate], list[str]]:
        return [NodeUpdate("n", 10.0, {k: v + math.inf for k, v in layers.items()})], []

    public = top_layers(TextEncoder(str(tiny_bert_dir)), 1)
    weights, history = tune_encoder(
        ScriptedNodes(config, answer, tmp_path), tmp_path, show_progress=False
    )
    assert all(torch.equal(weights[k], public[k]) for k in public)
    assert "not finite" in history[0]["rejected"][-1]
    saved = load_file(str(tmp_path / "text-encoder.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_an_encoder_rounds_file_without_its_pin_or_unreadable_is_refused(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A file without its ledger pin was resumed unchecked (its rounds' spending could be gone
    from the ledger), and one that is not the rounds' file raised out of safetensors or json
    (a traceback): each is refused, naming the file and what is wrong, and nothing is touched."""
    config = RunConfig(
        text_model=str(tiny_bert_dir), text_finetune_layers=1, text_finetune_rounds=1
    )
    tune_encoder(ScriptedNodes(config, lambda layers: ([], REFUSED), tmp_path), tmp_path, False)
    path, ledger = tmp_path / "text-encoder.safetensors", tmp_path / "ledger.jsonl"
    layers, kept = load_file(str(path)), ledger.read_bytes()
    files = {
        "pins no ledger entry": save(layers, metadata={"history": "[]", "complete": "true"}),
        "pins no ledger entry ": save(layers, metadata={"history": "[]", "ledger": "null"}),
        "it holds no rounds": save(layers),
        "its rounds are not a list": save(layers, metadata={"history": "{}", "ledger": "{}"}),
        "is not an encoder rounds' file: Error while deserializing": b"garbage" * 9,
        "is not an encoder rounds' file: ": save(layers)[:100],  # cut short
    }
    for problem, content in files.items():
        path.write_bytes(content)
        with pytest.raises(SystemExit, match=f"fedrec: {path} .*{problem.strip()}") as refused:
            require_ledger(tmp_path)
        assert "start over with another --out" in str(refused.value)
        assert path.read_bytes() == content and ledger.read_bytes() == kept
