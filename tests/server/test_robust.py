"""Bad actors: malformed updates are rejected and logged with their node
(server/federation/strategy.py),
well-formed malicious ones (simulations/attacks.py) are what robust aggregation resists, the
ledger recovers spending whose reply was lost (server/privacy/ledger_gaps.py), and ``fedrec bench
robust`` measures it all end to end on tiny data."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from helpers import TEST_DEVICE, cli_settings, metadata, node_reply

from server.federation.aggregation import NodeUpdate, aggregate
from server.federation.progress import ReplyProgress
from server.federation.strategy import FedRecStrategy
from server.privacy.accounting import epsilon_curve
from server.privacy.ledger import PrivacyLedger, verify_chain
from server.privacy.ledger_gaps import record_lost_contributions
from shared.federation.wire import ITEM_TABLES, decode, encode, trainable_state
from shared.recommender.model import FusionRecommender, ModelConfig
from shared.runs.config import RunConfig
from simulations import simulate
from simulations.attacks import AttackGrid, attack_update, check_attack
from simulations.cli import main

ITEMS = 12


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = ModelConfig(num_items=ITEMS, text_dim=8, dim=4, max_len=5, layers=1, heads=2)
    text = torch.nn.functional.normalize(torch.randn(ITEMS, 8), dim=1)
    return trainable_state(FusionRecommender(config, text))


def trained(state: dict[str, torch.Tensor], seed: int, rows=None) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    return encode(
        {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}, rows
    )


def delta_norm(arrays: dict[str, np.ndarray], state: dict[str, torch.Tensor]) -> float:
    tensors, rows = decode(arrays, state)
    total = 0.0
    for name, value in tensors.items():
        base = state[name]
        if name in rows:
            base = base[torch.as_tensor(rows[name] + ITEM_TABLES[name])]
        total += float(((value - base) ** 2).sum())
    return total**0.5


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row-sparse"])
def test_attacks_transform_the_update_and_stay_well_formed(state, sparse: bool) -> None:
    rows = dict.fromkeys(ITEM_TABLES, np.array([0, 4, 7])) if sparse else None
    honest = trained(state, 1, rows)
    reference = encode(state)
    rng = np.random.default_rng(0)
    base = delta_norm(honest, state)
    for attack, factor in (("scale", 10.0), ("sign-flip", -10.0), ("random", None)):
        attacked = attack_update(honest, reference, attack, 10.0, rng)
        decode(attacked, state)  # well-formed: validation alone cannot catch it
        assert delta_norm(attacked, state) == pytest.approx(10 * base, rel=1e-3)
        if factor is not None:
            name = "position.weight"
            np.testing.assert_allclose(
                attacked[name] - reference[name],
                factor * (honest[name] - reference[name]),
                atol=1e-5,
            )
        if sparse:
            assert all(np.array_equal(attacked[f"{t}@rows"], rows[t]) for t in ITEM_TABLES)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"attack": "flood", "malicious_nodes": 1}, "attack must be one of"),
        ({"attack": "scale", "malicious_nodes": 3, "clients": 3}, "in [0, clients)"),
        ({"attack": "scale"}, "together"),
        ({"malicious_nodes": 1}, "together"),
        (
            {"attack": "scale", "malicious_nodes": 1, "node_dp": True, "secagg": True},
            "secagg=false",
        ),
    ],
)
def test_impossible_attack_settings_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        check_attack(RunConfig(**settings))
    check_attack(RunConfig())  # no attack: nothing to refuse


class FakeGrid:
    """Answers every message with a prepared reply, as the simulation engine would."""

    def __init__(self, replies: list[Message]):
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)

    def push_messages(self, messages):
        return ["m" for _ in messages]  # what every prepared reply answers

    def pull_messages(self, message_ids):
        return list(self.replies)

    def get_node_ids(self):
        return [1, 2, 3]


@pytest.mark.parametrize("progress", [False, True])
def test_the_attack_grid_replaces_only_the_malicious_replies(state, progress: bool) -> None:
    """Also over the progress reports beneath it, as ``fedrec simulate`` stacks them."""
    honest = {f"regional-{k}": trained(state, k) for k in range(3)}
    engine = FakeGrid([node_reply(n, a) for n, a in honest.items()])
    grid = AttackGrid(
        ReplyProgress(engine, show_progress=False) if progress else engine,
        RunConfig(clients=3, malicious_nodes=1, attack="sign-flip"),
    )
    out = {"arrays": ArrayRecord({k: Array(v) for k, v in encode(state).items()})}
    message = Message(RecordDict(out), metadata=metadata(0, 1, reply_to=""))
    replies = grid.send_and_receive([message])
    assert grid.get_node_ids() == [1, 2, 3]  # the rest of the Grid is the real one's
    for r in replies:
        node = r.content["privacy"]["node"]
        sent = {k: a.numpy() for k, a in r.content["arrays"].items()}
        same = all(np.array_equal(sent[k], honest[node][k]) for k in sent)
        assert same == (node != "regional-0"), node


def test_the_server_rejects_malformed_updates_and_logs_their_node(state, caplog) -> None:
    good = trained(state, 0)
    name = "position.weight"
    bad = {
        "non-finite": {**good, name: np.full_like(good[name], np.inf)},
        "nan": {**good, name: np.full_like(good[name], np.nan)},
        "wrong-shape": {**good, name: good[name][:-1]},
        "wrong-dtype": {**good, name: good[name].astype(np.int64)},
        "missing": {k: v for k, v in good.items() if k != name},
        "absurd-norm": {k: v * 1e6 for k, v in good.items()},
    }
    replies = [node_reply("honest", good)] + [node_reply(node, a) for node, a in bad.items()]
    with caplog.at_level(logging.WARNING, logger="fedrec.server"):
        updates, rejected = FedRecStrategy(RunConfig()).node_updates(replies, state)
    assert [u.node for u in updates] == ["honest"]
    assert [r.split(":")[0] for r in rejected] == list(bad)
    logged = caplog.text
    for node in bad:
        assert f"rejected the update of node {node}" in logged


@pytest.mark.parametrize("attack", ["scale", "sign-flip", "random"])
def test_robust_aggregation_resists_two_of_ten_attackers(state, attack: str) -> None:
    reference = encode(state)
    rng = np.random.default_rng(1)
    arrays = [trained(state, k) for k in range(10)]
    arrays[:2] = [attack_update(a, reference, attack, 10.0, rng) for a in arrays[:2]]
    honest_mean = aggregate(
        state,
        [NodeUpdate(str(k), 1.0, decode(a, state)[0]) for k, a in enumerate(arrays[2:])],
        "mean",
    )
    updates = [NodeUpdate(str(k), 1.0, decode(a, state)[0]) for k, a in enumerate(arrays)]

    def error(method: str) -> float:
        delta = aggregate(state, updates, method, trim=0.2)
        return sum(float(((delta[k] - honest_mean[k]) ** 2).sum()) for k in delta) ** 0.5

    plain = error("mean")
    assert error("median") < plain / 3 and error("trimmed") < plain / 3


def test_a_lost_contribution_is_recovered_before_the_next(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    report = {
        "epsilon": 1.0,
        "delta": 1e-4,
        "noise_multiplier": 1.2,
        "sample_rate": 0.5,
        "steps": 4,
        "max_grad_norm": 1.0,
        "contribution_index": 0,
        "accountant": "prv",
        "mechanism": "poisson_subsampled_gaussian",
        "unit": "u",
        "target_epsilon": 8.0,
    }
    ledger.append("contribution", round=1, node="a", num_customers=9, **report)
    later = {**report, "contribution_index": 3}  # contributions 1 and 2 never arrived
    recovered = record_lost_contributions(ledger, 3, "a", {**later, "num_customers": 9})
    assert [e["contribution_index"] for e in recovered] == [1, 2]
    assert all("recovered" in e for e in recovered)
    curve = epsilon_curve([ledger.entries[0], *recovered])
    assert [e["epsilon"] for e in recovered] == curve[1:]
    # the gap takes the costliest known release's parameters: here an encoder round's
    costly = {**report, "purpose": "encoder", "noise_multiplier": 0.6, "contribution_index": 3}
    ledger.append("contribution", round=1, node="c", num_customers=9, **costly)
    cheap = {**report, "purpose": "training", "contribution_index": 6, "num_customers": 9}
    (lost_one, lost_two) = record_lost_contributions(ledger, 2, "c", cheap)
    assert lost_one["noise_multiplier"] == lost_two["noise_multiplier"] == 0.6
    nothing = record_lost_contributions(ledger, 3, "b", {**report, "num_customers": 9})
    assert nothing == []  # nothing missing
    assert verify_chain(ledger.entries) == []


@pytest.mark.e2e
def test_bench_robust_writes_the_comparison(
    tiny_synth_dataset_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The attacked, defended run is a real federation (a malicious node on Flower's
    simulation engine); the other three of the grid are the same ``fedrec simulate`` path
    with another strategy or no attack, so a stand-in writes their metrics.json from the
    settings the bench gave them (one Ray start-up, not four)."""
    real = simulate.run

    def run(args) -> int:  # noqa: ANN001
        if args.out.name == "sign-flip-median":
            return real(args)
        args.out.mkdir(parents=True)
        config = simulate.config_from_args(args).to_dict()
        metrics = {"config": config, "test": {"ndcg@10": 0.5}, "rounds": [{"rejected": []}]}
        (args.out / "metrics.json").write_text(json.dumps(metrics))
        return 0

    monkeypatch.setattr(simulate, "run", run)
    out = tmp_path / "bench"
    tiny = [
        *cli_settings(
            {"dim": 16, "layers": 1, "max_len": 10, "local_steps": 0, "text_model": tiny_bert_dir}
        ),
        "--device",
        TEST_DEVICE,
        "--quiet",
    ]
    assert (
        main(
            [
                "bench",
                "robust",
                "--data",
                str(tiny_synth_dataset_dir),
                "--out",
                str(out),
                "--clients",
                "2",
                "--malicious",
                "1",
                "--attacks",
                "sign-flip",
                "--defences",
                "median",
                "--rounds",
                "1",
                *tiny,
            ]
        )
        == 0
    )
    result = json.loads((out / "robust.json").read_text())
    assert set(result["test_ndcg@10"]) == {"none", "sign-flip"}
    assert all(set(row) == {"fedavg", "median"} for row in result["test_ndcg@10"].values())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"clean-fedavg", "clean-median", "sign-flip-fedavg", "sign-flip-median"}
    assert runs["sign-flip-median"]["malicious_nodes"] == 1
    assert runs["clean-fedavg"]["malicious_nodes"] == 0
    assert {(r["attack"], r["strategy"]) for r in runs.values()} == {
        ("none", "fedavg"),
        ("none", "median"),
        ("sign-flip", "fedavg"),
        ("sign-flip", "median"),
    }
    attacked = json.loads((out / "sign-flip-median" / "metrics.json").read_text())
    assert (attacked["config"]["strategy"], attacked["config"]["attack"]) == ("median", "sign-flip")
    assert len(attacked["rounds"]) == 1 and 0 <= attacked["test"]["ndcg@10"] <= 1
