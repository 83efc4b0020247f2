"""Node-level DP and SecAgg+ (shared/federation/node_dp.py, server/privacy/node_privacy.py,
server/federation/secagg.py):
clipping, the noise's scale, the ledger entries the audit recomputes, the refused combinations,
and short simulated federations (2 nodes, tiny model) with node-level DP, with and without
SecAgg+."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, node_reply

from server.federation.strategy import FedRecStrategy
from server.privacy.audit import audit
from server.privacy.ledger import PrivacyLedger, entry_hash, read_ledger
from server.privacy.node_privacy import NodeLevelDP, node_level_privacy
from shared.federation.node_dp import check_node_dp, clipped_update
from shared.runs.config import RunConfig
from simulations.cli import main

NODE_DP = ["--set", "node_dp=true", "--set", "node_target_epsilon=20"]


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "id_scores.bias": scale * torch.randn(300, generator=generator),
        "blocks.0.qkv.weight": scale * torch.randn(48, 16, generator=generator),
    }


def norm(update: dict) -> float:
    return float(
        np.sqrt(sum((np.asarray(v, dtype=np.float64) ** 2).sum() for v in update.values()))
    )


def test_clipping_bounds_every_node_update() -> None:
    before = state(0)
    for clip in (0.01, 1.0, 5.0):
        config = RunConfig(node_dp=True, node_clip_norm=clip)
        for seed in range(1, 6):
            after = {
                k: v + w
                for (k, v), w in zip(before.items(), state(seed, 3.0).values(), strict=True)
            }
            update = clipped_update(after, before, config)
            assert norm(update) <= clip * (1 + 1e-5)
            assert set(update) == set(before) and all(
                v.dtype == np.float32 for v in update.values()
            )
    small = {k: v + 1e-3 for k, v in before.items()}  # within the bound: sent as it is
    update = clipped_update(small, before, RunConfig(node_dp=True))
    assert all(np.allclose(update[k], 1e-3, atol=1e-6) for k in before)
    # no change: a zero update, not a division by zero
    assert norm(clipped_update(before, before, RunConfig(node_dp=True))) == 0.0
    # under customer DP only the weights dp-train trains can move: the rest is zero, exactly
    moved = {k: v + 1.0 for k, v in before.items()}
    update = clipped_update(moved, before, RunConfig(node_dp=True, dp=True, dp_train="bias"))
    assert not update["blocks.0.qkv.weight"].any() and update["id_scores.bias"].any()


def test_noise_has_the_right_std_and_only_where_weights_can_learn(tmp_path: Path) -> None:
    config = RunConfig(
        node_dp=True, dp=True, dp_train="bias", node_clip_norm=2.0, clients=4, rounds=3
    )
    node_dp = NodeLevelDP(config, PrivacyLedger(tmp_path / "ledger.jsonl"))
    total = {
        "id_scores.bias": np.zeros(200_000, np.float32),
        "blocks.0.qkv.weight": np.zeros((48, 16), np.float32),
    }
    mean = node_dp.release(1, total, sampled=4, aggregated=4)
    noise = mean["id_scores.bias"].numpy().astype(np.float64)
    expected = node_dp.sigma * 2.0 / 4  # sigma C / n on the mean
    assert noise.std() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean()) < 5 * expected / np.sqrt(noise.size)  # unseeded: 5 std of the mean
    assert not mean["blocks.0.qkv.weight"].any()  # frozen under dp-train=bias: never noised
    # the mean divides the (re-clipped) sum by the nodes sampled, whoever answered
    from server.federation.aggregation import NodeUpdate

    base = state(0)
    updates = [NodeUpdate(str(i), 1.0, {k: v + 10.0 for k, v in base.items()}) for i in range(3)]
    summed = node_dp.total(base, updates)
    assert norm(summed) == pytest.approx(3 * 2.0, rel=1e-5)  # each re-clipped to C = 2
    assert not summed["blocks.0.qkv.weight"].any()


def release_rounds(out: Path, config: RunConfig, rounds: int) -> NodeLevelDP:
    ledger = PrivacyLedger(out / "ledger.jsonl")
    ledger.append("run_start", config=config.to_dict(), unit="u")
    node_dp = NodeLevelDP(config, ledger)
    for r in range(1, rounds + 1):
        node_dp.release(r, {"id_scores.bias": np.zeros(3, np.float32)}, 2, 2)
    return node_dp


def test_node_level_ledger_is_recomputed_by_the_audit(tmp_path: Path) -> None:
    config = RunConfig(node_dp=True, node_target_epsilon=4.0, dp_rounds=3, clients=2)
    node_dp = release_rounds(tmp_path, config, 3)
    assert node_dp.refusal() is not None  # calibrated for 3 rounds: a 4th would pass the budget
    resumed = NodeLevelDP(config, PrivacyLedger(tmp_path / "ledger.jsonl"))
    assert resumed.accountant.num_releases == 3 and resumed.refusal() is not None
    report = audit(tmp_path)
    assert report["passed"], report["checks"]
    entries = read_ledger(tmp_path / "ledger.jsonl")
    assert report["node_level"]["rounds"] == 3
    assert entries[-1]["epsilon"] >= report["node_level"]["epsilon"]  # RDP >= PLD
    assert report["node_level"]["epsilon"] <= 4.0 and "one node" in report["node_level"]["unit"]

    # an epsilon lowered and re-hashed (so the chain alone would not show it) fails the audit
    entries[2]["epsilon"] *= 0.5
    for i in range(2, len(entries)):
        entries[i]["prev_hash"] = entries[i - 1]["hash"]
        entries[i]["hash"] = entry_hash(entries[i])
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = audit(tmp_path)
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert failed == ["node_level"], report["checks"]


def test_node_level_statements_round_epsilon_up(tmp_path: Path, monkeypatch) -> None:
    """metrics.json's and the audit's node-level statements: epsilon 3.99949 was stated 3.999
    by ".3f", below what was spent; it is 4.000."""
    config = RunConfig(node_dp=True, node_target_epsilon=4.0, dp_rounds=2, clients=2)
    release_rounds(tmp_path, config, 2)
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    ledger.entries[-1]["epsilon"] = 3.99949  # in memory only: what metrics.json would state
    assert node_level_privacy(ledger, config)["statement"].startswith(
        "Node level: the released model is (4.000, 1e-05)-"
    )
    monkeypatch.setattr("server.privacy.accounting.epsilon_curve", lambda e: [1.0, 3.99949])
    assert audit(tmp_path)["node_level"]["statement"].startswith("(4.000, 1e-05)-DP")


def test_spending_past_the_node_level_budget_fails_the_audit(tmp_path: Path) -> None:
    planned = RunConfig(node_dp=True, node_target_epsilon=4.0, dp_rounds=2, clients=2)
    release_rounds(tmp_path, planned, 4)  # twice the rounds the noise was calibrated for
    report = audit(tmp_path)
    node_level = next(c for c in report["checks"] if c["name"] == "node_level")
    assert not node_level["passed"] and "budget" in node_level["problems"][0]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"node_dp": True, "strategy": "median"}, "median"),
        ({"node_dp": True, "strategy": "trimmed"}, "trimmed"),
        ({"node_dp": True, "strategy": "fedadam"}, "fedadam"),
        ({"node_dp": True, "secagg": True, "strategy": "median"}, "never sees single updates"),
        ({"secagg": True}, "secagg=true needs node-dp=true"),
        ({"node_dp": True, "secagg": True, "clients": 1}, "at least 2 nodes"),
        ({"node_dp": True, "wire_dtype": "float16"}, "float32"),
        ({"node_dp": True, "node_clip_norm": 0.0}, "node-clip-norm"),
        ({"node_dp": True, "node_delta": 1.0}, "node-delta"),
        ({"node_dp": True, "node_delta": 0.5, "clients": 3}, r"must be in \(0, 1/clients"),
    ],
)
def test_incompatible_combinations_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_node_dp(RunConfig(**settings))


def test_a_row_sparse_update_is_rejected_under_node_dp() -> None:

    base = state(0)
    arrays = {
        "id_scores.bias": np.ones(2, np.float32),
        "id_scores.bias@rows": np.array([0, 1]),
        "blocks.0.qkv.weight": base["blocks.0.qkv.weight"].numpy(),
    }
    reply = node_reply("regional-0", arrays, customers=5)
    updates, rejected = FedRecStrategy(RunConfig(node_dp=True)).node_updates([reply], base)
    assert not updates and "row-sparse" in rejected[0]


# --- simulated federations --------------------------------------------------------------------


def simulate(data: Path, out: Path, *extra: str) -> dict:
    assert (
        main(
            [
                "simulate",
                "--data",
                str(data),
                "--out",
                str(out),
                "--clients",
                "2",
                "--rounds",
                "2",
                "--dp",
                "--target-epsilon",
                "3",
                *TINY,
                *NODE_DP,
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.e2e
class TestPlainFederation:
    """A federation under both kinds of DP, updates averaged in plain: a test group of its own
    (its run takes minutes; the SecAgg+ one runs on another worker)."""

    def test_a_federation_states_both_guarantees(
        self, tiny_synth_dataset_dir: Path, tmp_path: Path
    ) -> None:
        states_both_guarantees(tiny_synth_dataset_dir, tmp_path, secagg=False)


@pytest.mark.e2e
class TestSecAggFederation:
    """The same federation, updates summed by SecAgg+: a test group of its own."""

    def test_a_federation_states_both_guarantees(
        self, tiny_synth_dataset_dir: Path, tmp_path: Path
    ) -> None:
        states_both_guarantees(tiny_synth_dataset_dir, tmp_path, secagg=True)


def states_both_guarantees(tiny_synth_dataset_dir: Path, tmp_path: Path, secagg: bool) -> None:
    """Both guarantees stated, both kinds of release ledgered in order, and audited."""
    out = tmp_path / "run"
    metrics = simulate(tiny_synth_dataset_dir, out, "--set", f"secagg={str(secagg).lower()}")
    privacy = metrics["privacy"]
    assert "one customer" in privacy["unit"] and 0 < privacy["epsilon"] <= 3 + 1e-6
    node_level = privacy["node_level"]
    assert "one node" in node_level["unit"] and 0 < node_level["epsilon"] <= 20
    assert node_level["releases"] == 2 and node_level["secure_aggregation"] is secagg
    assert "one node" in privacy["statement"] and "each customer" in privacy["statement"]
    assert [h["nodes"] for h in metrics["rounds"]] == [2, 2]
    entries = read_ledger(out / "ledger.jsonl")
    kinds = [e["kind"] for e in entries]
    assert kinds.count("contribution") == 4 and kinds.count("node_level") == 2
    # every private request was ledgered before it left and closed once its replies were in
    assert kinds.count("requested") == kinds.count("answered") >= 2
    releases = [kind for kind in kinds if kind not in ("requested", "answered")]
    # each round's node-level release comes after that round's customer-level contributions
    assert releases == [
        "run_start",
        "contribution",
        "contribution",
        "node_level",
        "contribution",
        "contribution",
        "node_level",
        "run_end",
    ]
    assert all(e["secure_aggregation"] is secagg for e in entries if e["kind"] == "node_level")
    assert main(["audit", str(out)]) == 0


def test_a_sum_longer_than_the_nodes_clipping_allows_is_named() -> None:
    """What a node that skips its clipping under SecAgg+ adds (C on every coordinate) makes
    a sum no clipped nodes can: refused; a sum of clipped updates, with the quantisation's
    error, passes."""
    from server.federation.secagg import QUANTIZATION_LEVELS, sum_problem

    clip, shape = 3.0, (400, 50)
    honest = [np.full(shape, clip / np.sqrt(np.prod(shape))) for _ in range(3)]
    error = 2 * clip / QUANTIZATION_LEVELS
    assert sum_problem({"w": sum(honest) + error}, 3, clip) is None
    hostile = sum(honest[:2]) + np.full(shape, clip)
    assert "norm" in sum_problem({"w": hostile}, 3, clip)
    assert sum_problem({"w": np.full(shape, np.nan)}, 3, clip) == "not finite"


class FixedUpdate:
    """A stand-in node for the SecAgg+ check: a known update per node, clipped as fedrec's."""

    @staticmethod
    def update(partition: int) -> dict[str, np.ndarray]:
        base = state(0)
        moved = {
            k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(partition))
            for k, v in base.items()
        }
        return clipped_update(moved, base, RunConfig(node_dp=True, node_clip_norm=3.0))

    @staticmethod
    def app(mods: list | None = None):  # noqa: ANN205
        """The nodes, each answering through ``mods`` (default: SecAgg+'s own)."""
        from flwr.client import NumPyClient
        from flwr.client.mod import secaggplus_mod
        from flwr.clientapp import ClientApp

        class Node(NumPyClient):
            def __init__(self, partition: int):
                self.partition = partition

            def fit(self, parameters, config):  # noqa: ANN001, ANN201
                update = FixedUpdate.update(self.partition)
                skips = HOSTILE_ROUNDS.get(int(config["server-round"])) == "unclipped"
                if skips and self.partition == 0:  # every coordinate at the workflow's +-C
                    update = {k: np.full_like(v, 100.0) for k, v in update.items()}
                return [update[n] for n in str(config["state-names"]).split(",")], 1, {}

        return ClientApp(
            client_fn=lambda context: Node(int(context.node_config["partition-id"])).to_client(),
            mods=[secaggplus_mod] if mods is None else mods,
        )


# rounds 1 and 6 are honest
HOSTILE_ROUNDS = {2: "no configs", 3: "another shape", 4: "unclipped", 5: "forged shares"}
LAST_ROUND = 6


def secure_rounds(client_app) -> dict[int, dict]:  # noqa: ANN001
    """Five SecAgg+ rounds (``SecureAggregation.train_round``) of 3 simulated nodes answering
    with ``client_app``, in one simulation: ``{round: {"round": what it returned}}``, or
    ``{round: {"raised": what it raised}}``."""
    import ray.cloudpickle
    from flwr.app import ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server.federation.secagg import SecureAggregation

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers lack tests/
    config = RunConfig(node_dp=True, secagg=True, node_clip_norm=3.0, clients=3, min_nodes=3)
    server, found = ServerApp(), {}

    @server.main()
    def _(grid, context) -> None:  # noqa: ANN001
        secure = SecureAggregation(grid, config, ConfigRecord({}))
        for server_round in range(1, LAST_ROUND + 1):
            found[server_round] = {}
            try:
                found[server_round]["round"] = secure.train_round(server_round, state(0))
            except Exception as error:  # noqa: BLE001 (what the tests look for)
                found[server_round]["raised"] = repr(error)

    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return found


def hostile_masked_vector():  # noqa: ANN201
    """A SecAgg+ mod for a node that breaks its masked vector (partition 0; the others
    follow the protocol) in the rounds of ``HOSTILE_ROUNDS``: ``no configs`` leaves out the
    record that carries it, ``another shape`` sends one of 3 values where the model has
    hundreds; ``forged shares`` answers the unmasking with zeroed secret shares."""
    import io

    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        asked = dict(msg.content.config_records.get(RECORD_KEY_CONFIGS, {}))
        reply = secaggplus_mod(msg, context, call_next)
        kind = HOSTILE_ROUNDS.get(int(msg.metadata.group_id))
        breaks = kind in ("no configs", "another shape")  # "unclipped" masks a valid vector
        hostile = int(context.node_config["partition-id"]) == 0
        if hostile and kind == "forged shares" and asked.get(Key.STAGE) == Stage.UNMASK:
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            configs[Key.SHARE_LIST] = [bytes(len(b)) for b in configs[Key.SHARE_LIST]]
        if hostile and breaks and asked.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            if kind == "no configs":
                del reply.content.config_records[RECORD_KEY_CONFIGS]
            else:
                buffer = io.BytesIO()
                np.save(buffer, np.zeros(3, np.int64))
                configs = reply.content.config_records[RECORD_KEY_CONFIGS]
                configs[Key.MASKED_PARAMETERS] = [buffer.getvalue()] * len(state(0))
        return reply

    return mod


@pytest.fixture(scope="module")
def secure() -> dict[int, dict]:
    """One simulation for every SecAgg+ check: honest, the hostile rounds, honest."""
    return secure_rounds(FixedUpdate.app(mods=[hostile_masked_vector()]))


@pytest.mark.e2e
class TestSecureRounds:
    """The checks of one SecAgg+ simulation (``secure``): one test group."""

    @pytest.mark.parametrize("server_round", [1, LAST_ROUND], ids=["first", "after halted rounds"])
    def test_secagg_sum_equals_the_plain_sum(self, secure: dict, server_round: int) -> None:
        found = secure[server_round]
        assert "raised" not in found, found["raised"]
        total, reports, sampled = found["round"]
        nodes = 3
        assert len(sampled) == nodes and len(reports) == nodes
        assert sorted(sampled) == sorted(node_id for node_id, _ in reports)
        expected = {k: sum(FixedUpdate.update(p)[k] for p in range(nodes)) for k in state(0)}
        step = 2 * 3.0 / 2**22  # one quantisation level over [-C, C]
        for name, value in expected.items():
            assert np.abs(total[name] - value).max() <= nodes * step

    @pytest.mark.parametrize("kind", list(HOSTILE_ROUNDS.values()))
    def test_a_malformed_masked_vector_halts_the_secagg_round_not_the_run(
        self, secure: dict, kind: str
    ) -> None:
        """One node's masked vector that SecAgg+ cannot read (no record, another shape) raised
        out of Flower's workflow (a KeyError, a ValueError) and ended the run before the round's
        reports reached the ledger: the honest nodes' spending was missing from it. The round now
        halts as the protocol does when too few nodes complete it: no sum, no report, every
        sampled node named (the round loop ledgers each as unanswered under customer-level DP);
        the next round sums again (test_secagg_sum_equals_the_plain_sum[after halted rounds]).
        A node that skips its clipping (``unclipped``: the workflow bounds each coordinate to
        +-C, not the update's norm) was summed in, an update of norm C x sqrt(weights); such a
        sum, longer than C per node, now halts the round the same way. Secret shares forged in
        the unmasking (``forged shares``) halt it too (never a crash, never a sum)."""
        (server_round,) = [r for r, k in HOSTILE_ROUNDS.items() if k == kind]
        found = secure[server_round]
        assert "raised" not in found, found["raised"]
        total, reports, sampled = found["round"]
        assert total is None and reports == [] and len(sampled) == 3
