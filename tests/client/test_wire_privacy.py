"""Nothing private on the wire: every message a node sends (client/client_app.py, the train,
evaluate and start-guard replies, with and without DP) carries the model's weights and
aggregate numbers only: no customer id, history or data row, in any key or value of any
record."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import TEST_DEVICE, TINY_SETTINGS

from client import client_app
from client.client_app import app
from client.node import load_node
from server.federation.settings import settings_record
from server.privacy.node_keys import NodeKeys
from shared.data.errors import DataError
from shared.federation.reports import parse_report
from shared.federation.wire import COUNTS, ITEM_TABLES, ROWS, encode, trainable_state
from shared.recommender.finetune import top_layers
from shared.recommender.metrics import METRICS
from shared.recommender.model import FusionRecommender
from shared.recommender.text import TextEncoder
from shared.runs.config import RunConfig

ALLOWED_METRICS = {
    "num-examples",
    "customers",
    "bytes-up",
    "loss",
    "reversed-histories",  # whether it learnt its histories backwards too (without DP)
    "coverage@20",
    *METRICS,
    *(f"noisy_sum_{m}" for m in METRICS),
    "noisy_customers",
    "noisy_gain",  # the start guard's answer (under DP only)
    "valid-customers",
    *(f"valid-{m}" for m in METRICS),
}


def sent_bytes(record: object) -> list[bytes]:
    """Every key and value of a record, as bytes."""
    if isinstance(record, ArrayRecord):
        return [k.encode() for k in record] + [a.data for a in record.values()]
    return [f"{k}={v!r}".encode() for k, v in record.items()]


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
@pytest.mark.parametrize("kind", ["train", "evaluate", "evaluate.guard"])
def test_a_node_sends_weights_and_aggregates_only(
    node_dir: Path, tiny_bert_dir: Path, dp: bool, kind: str, monkeypatch
) -> None:
    for field in ("_run_id", "_node_id", "_task_id"):  # as in the process Flower starts
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=dp, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    state = trainable_state(model)
    # asked to validate half its customers: exact figures without DP, none under DP
    settings = settings_record(
        config, config.target_epsilon, node.catalog_digest, node_dir.parent, valid_fraction=0.5
    )
    settings["run-id"] = "0" * 64
    settings["server-round"] = 1
    records = {
        "arrays": ArrayRecord({k: Array(v) for k, v in encode(state).items()}),
        "config": settings,
    }
    if kind == "evaluate.guard":  # the start guard sends the public start too
        records["start"] = records["arrays"]
    message = Message(RecordDict(records), dst_node_id=1, message_type=kind)
    context = Context(
        run_id=1,
        node_id=1,
        # a deployed node; its floor on exact figures lowered to this tiny node's size
        node_config={
            "data-dir": str(node_dir),
            "require-dp": dp,
            "min-exact-customers": 1,
            "text-models": str(tiny_bert_dir),
        },
        state=RecordDict(),
        run_config={},
    )
    reply = app(message, context)
    assert not reply.has_error(), reply.error

    customers = pd.read_csv(node_dir / "interactions.csv.gz", dtype=str)["user_id"].unique()
    assert len(customers) > 10
    wire = b"".join(part for record in reply.content.values() for part in sent_bytes(record))
    leaked = [c for c in customers if c.encode() in wire]
    assert leaked == [] and b"customer-" not in wire and b"private" not in wire

    content = reply.content
    assert set(content) <= {"arrays", "metrics", "privacy", COUNTS}
    # popularity's counts leave a simulated node only (tests/client/test_node.py): this node
    # is deployed, and a server whose settings ask for them gets none (it got them: review)
    assert COUNTS not in content
    assert set(content["metrics"]) <= ALLOWED_METRICS  # aggregates: one number each
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    if dp:  # under DP only the weights and the counts leave: no loss, no training choices
        assert not {"loss", "reversed-histories"} & set(content["metrics"])
    if "privacy" in content:  # the node's name and its privacy spending, nothing else
        for key, value in content["privacy"].items():
            assert isinstance(value, (bool, int, float)) or key in {
                "node",
                "accountant",
                "mechanism",
                "unit",
                "reason",
                "purpose",
                "run_id",
                "update_digest",
                "signature",
                "key_id",
                "public_key",
            }, key
        assert content["privacy"]["node"] == "regional-0"
        if "mechanism" in content["privacy"]:  # a deployed node that says nothing: no vouch
            assert content["privacy"]["exclusive_customers"] is False
    if kind == "evaluate.guard":  # one noisy number under DP; refused without
        assert "arrays" not in content
        assert set(content["metrics"]) == ({"noisy_gain"} if dp else set())
        assert content["privacy"]["purpose" if dp else "refused"] == ("guard" if dp else True)
        return
    if kind == "evaluate":
        assert "arrays" not in content
        validated = {k for k in content["metrics"] if k.startswith("valid-")}
        assert validated == (set() if dp else {"valid-customers", "valid-hr@10", "valid-ndcg@10"})
        return
    arrays = {k: a.numpy() for k, a in content["arrays"].items()}
    for name, array in arrays.items():  # the model's own tensors: no table of data rows
        if name.endswith(ROWS):
            table = name[: -len(ROWS)]
            assert table in ITEM_TABLES and array.dtype.kind in "iu"
            assert array.max(initial=0) < len(node.text)  # item rows, not customers
            continue
        assert array.dtype.kind == "f"
        expected = tuple(state[name].shape)
        if name + ROWS in arrays:
            expected = (len(arrays[name + ROWS]), *expected[1:])
        assert array.shape == expected, name
    assert set(name for name in arrays if not name.endswith(ROWS)) == set(state)
    assert all(
        torch.isfinite(torch.from_numpy(np.asarray(a, dtype=np.float32))).all()
        for n, a in arrays.items()
        if not n.endswith(ROWS)
    )


def deployed_context(node_dir: Path, text_model: Path | str) -> Context:
    """The context Flower gives a deployed node reading ``node_dir``, that agrees to load
    ``text_model``."""
    node_config = {
        "data-dir": str(node_dir),
        "min-exact-customers": 1,
        "text-models": str(text_model),
    }
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def accountant_state(node_dir: Path) -> bytes | None:
    """The node's accountant file as it is on disk (None: it has spent nothing yet)."""
    accountant = node_dir / "privacy" / "accountant.json"
    return accountant.read_bytes() if accountant.exists() else None


@pytest.mark.parametrize("crafted", [float("nan"), 1e20])
@pytest.mark.parametrize("kind", ["train", "evaluate", "evaluate.guard"])
def test_a_node_refuses_weights_that_could_single_out_a_customer(
    node_dir: Path, tiny_bert_dir: Path, kind: str, crafted: float, monkeypatch
) -> None:
    """One product's history-side row set to NaN or 1e20 makes exactly the customers who
    bought it score non-finite, and a non-finite gradient passes DP-SGD's clipping: the
    release was NaN if and only if such a customer was sampled (the operator's one-bit
    membership test). The node now refuses such weights before touching its data, spending
    nothing."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    state = trainable_state(model)
    state["id_in.weight"][3] = crafted
    settings = settings_record(config, config.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    arrays = ArrayRecord({k: Array(v) for k, v in encode(state).items()})
    records = {"arrays": arrays, "config": settings}
    if kind == "evaluate.guard":
        records["start"] = arrays
    context = deployed_context(node_dir, tiny_bert_dir)
    before = accountant_state(node_dir)
    reply = app(Message(RecordDict(records), dst_node_id=1, message_type=kind), context)
    privacy = reply.content["privacy"]
    assert privacy["refused"] is True and "the server's id_in.weight" in privacy["reason"]
    assert "arrays" not in reply.content and not reply.content["metrics"]
    assert accountant_state(node_dir) == before  # no spending


def test_a_node_charges_a_runs_requests_in_the_order_of_their_rounds(
    node_dir: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A private request delayed past a later round of its run (a slow network, a replayed
    message) is refused before anything is spent: the ledger counts an unanswered request as
    settled by the node's next release of a later round, which holds only if the node charges
    in that order. The same round's evaluation, and another run, go on."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    node = shutil.copytree(node_dir, tmp_path / "node")
    shutil.rmtree(node / "privacy", ignore_errors=True)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    data = load_node(str(node), config.text_model)
    model = FusionRecommender(config.model_config(len(data.text), data.text.shape[1]), data.text)
    arrays = ArrayRecord({k: Array(v) for k, v in encode(trainable_state(model)).items()})

    def ask(kind: str, server_round: int, run_id: str = "c" * 64, start: int = 0) -> dict:
        settings = settings_record(config, config.target_epsilon, data.catalog_digest, node.parent)
        settings["run-id"], settings["server-round"] = run_id, server_round
        settings.update({"server-start": start} if start else {})  # a server that numbers it
        content = RecordDict({"arrays": arrays, "config": settings})
        message = Message(content, dst_node_id=1, message_type=kind)
        return dict(app(message, deployed_context(node, tiny_bert_dir)).content["privacy"])

    assert "signature" in ask("train", 2)
    before = accountant_state(node)
    for kind in ("train", "evaluate"):
        late = ask(kind, 1)
        assert late["refused"] is True and "round 1 comes after" in late["reason"]
        assert accountant_state(node) == before  # nothing spent
    assert "signature" in ask("evaluate", 2)  # the same round
    assert "signature" in ask("train", 1, run_id="d" * 64)  # another run
    # a killed server's request the node still held when the restarted one (its next start)
    # asked the same round: once the later start's is charged, refused (the ledger settled it)
    restarted = parse_report(ask("train", 2, start=2))
    assert restarted.release.server_start == 2  # signed into the release, and verifies
    assert NodeKeys(tmp_path / "keys").check(restarted, None) is None
    before = accountant_state(node)
    late = ask("train", 2, start=1)
    assert late["refused"] is True and "a request of server start 1, round 2" in late["reason"]
    assert accountant_state(node) == before


def test_a_node_refuses_a_model_larger_than_its_policy_allows(
    node_dir: Path, tiny_bert_dir: Path, monkeypatch
) -> None:
    """Settings within range can still ask for more weights than the node's machine holds;
    a deployed node refuses before it builds anything or spends (max-model-weights)."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    huge = replace(config, layers=4, heads=2, dp_dim=4096)
    settings = settings_record(huge, huge.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "e" * 64, 1
    arrays = ArrayRecord({k: Array(v) for k, v in encode(trainable_state(model)).items()})
    before = accountant_state(node_dir)
    message = Message(
        RecordDict({"arrays": arrays, "config": settings}), dst_node_id=1, message_type="train"
    )
    privacy = app(message, deployed_context(node_dir, tiny_bert_dir)).content["privacy"]
    assert privacy["refused"] is True and "max-model-weights=500000000" in privacy["reason"]
    assert accountant_state(node_dir) == before


@pytest.mark.parametrize("kind", ["train", "evaluate"])
@pytest.mark.parametrize(
    ("asked", "words"),
    [
        # one customer's attention over 4,096 positions in 16 heads: 285 M values a layer
        ({"dp_max_len": 4096, "heads": 16}, "max-step-activations=500000000"),
        # a private answer the server would throw away, charged all the same
        ({"eval_noise_multiplier": 1e7}, "eval-noise-multiplier 1e+07"),
        ({"dp_guard_noise_scale": 1e7}, "dp-guard-noise-scale 1e+07"),
    ],
    ids=["step", "eval-noise", "guard-noise"],
)
def test_a_node_refuses_a_step_or_a_noise_its_policy_does_not_allow(
    node_dir: Path, tiny_bert_dir: Path, kind: str, asked: dict, words: str, monkeypatch
) -> None:
    """Settings within range can still ask for a step no node's memory holds, or for private
    answers whose noise multiplier the server does not account (it would discard them after
    the node had charged them); a deployed node refuses before it builds anything or spends
    (max-step-activations; the noise range of shared/runs/config.py)."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    request = replace(config, **asked)
    settings = settings_record(
        request, request.target_epsilon, node.catalog_digest, node_dir.parent
    )
    settings["run-id"], settings["server-round"] = "f" * 64, 1
    arrays = ArrayRecord({k: Array(v) for k, v in encode(trainable_state(model)).items()})
    before = accountant_state(node_dir)
    message = Message(
        RecordDict({"arrays": arrays, "config": settings}), dst_node_id=1, message_type=kind
    )
    privacy = app(message, deployed_context(node_dir, tiny_bert_dir)).content["privacy"]
    assert privacy["refused"] is True and words in privacy["reason"]
    assert accountant_state(node_dir) == before


@pytest.mark.parametrize("run_id", ["", "r" * 64, "0" * 65, "0" * 63 + "\n", "A" * 64, "0" * 10**6])
def test_a_node_refuses_a_run_id_that_is_not_a_runs_hash(
    node_dir: Path, tiny_bert_dir: Path, run_id: str, monkeypatch
) -> None:
    """Every signed release and receipt carries the run's id: the node signs only the form the
    server gives every run (the sha256 of its first ledger entry), never free text of any size."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    settings = settings_record(config, config.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = run_id, 1
    arrays = ArrayRecord({k: Array(v) for k, v in encode(trainable_state(model)).items()})
    context = deployed_context(node_dir, tiny_bert_dir)
    before = accountant_state(node_dir)
    message = Message(
        RecordDict({"arrays": arrays, "config": settings}), dst_node_id=1, message_type="train"
    )
    reply = app(message, context)
    privacy = reply.content["privacy"]
    assert privacy["refused"] is True and "is not a run's id" in privacy["reason"]
    assert len(privacy["reason"]) < 200 and "arrays" not in reply.content
    assert accountant_state(node_dir) == before  # no spending


def _message(
    kind: str, settings: ConfigRecord, arrays: ArrayRecord, start: ArrayRecord | None
) -> Message:
    records = {"arrays": arrays, "config": settings}
    if kind == "evaluate.guard":
        records["start"] = start
    return Message(RecordDict(records), dst_node_id=1, message_type=kind)


@pytest.mark.parametrize("dtype", ["int64", "complex64", "bool"])
@pytest.mark.parametrize("kind", ["train", "evaluate", "evaluate.guard"])
def test_a_node_refuses_weights_that_are_not_floating_point(
    node_dir: Path, tiny_bert_dir: Path, kind: str, dtype: str, monkeypatch
) -> None:
    """Loading casts an integer or complex array into the model unchecked: a row of 10**18 (or
    a complex NaN's real part) passed the finiteness and magnitude check, which skipped every
    tensor not of a floating type, and reached DP-SGD as the NaN or 1e20 row above did (found
    fuzzing). Such weights are now refused, in the start guard's start too, spending nothing."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    node = load_node(str(node_dir), config.text_model)
    model = FusionRecommender(config.model_config(len(node.text), node.text.shape[1]), node.text)
    arrays = encode(trainable_state(model))
    crafted = arrays["id_in.weight"].astype(dtype)
    crafted[3] = {"int64": 10**18, "complex64": complex(float("nan"), 0), "bool": True}[dtype]
    settings = settings_record(config, config.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    honest = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    hostile = ArrayRecord({k: Array(v) for k, v in {**arrays, "id_in.weight": crafted}.items()})
    before = accountant_state(node_dir)
    guard = kind == "evaluate.guard"
    for sent, start in [(hostile, honest), (honest, hostile)] if guard else [(hostile, None)]:
        reply = app(
            _message(kind, settings, sent, start), deployed_context(node_dir, tiny_bert_dir)
        )
        privacy = reply.content["privacy"]
        assert privacy["refused"] is True, privacy
        assert f"id_in.weight is of dtype torch.{crafted.dtype}" in privacy["reason"]
        assert "arrays" not in reply.content and not reply.content["metrics"]
    assert accountant_state(node_dir) == before  # no spending


@pytest.mark.parametrize("hostile", ["missing", "wrong shape", "extra"])
def test_a_private_encoder_round_refuses_layers_that_are_not_the_encoders_before_spending(
    node_dir: Path, tiny_bert_dir: Path, hostile: str, monkeypatch
) -> None:
    """The layers were loaded into the encoder after the round was charged: a missing, extra or
    misshapen layer failed the round with an error once the node's accountant had spent it
    (found fuzzing). They are now loaded, and refused, before anything is charged."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(
        **TINY_SETTINGS,
        device=TEST_DEVICE,
        dp=True,
        text_model=str(tiny_bert_dir),
        text_finetune_layers=1,
    )
    node = load_node(str(node_dir), config.text_model)
    layers = {k: v.numpy() for k, v in top_layers(TextEncoder(config.text_model), 1).items()}
    first = next(iter(layers))
    layers = {
        "missing": {k: v for k, v in layers.items() if k != first},
        "wrong shape": {**layers, first: layers[first][..., :-1].copy()},
        "extra": {**layers, "encoder.layer.9.output.dense.bias": layers[first]},
    }[hostile]
    settings = settings_record(config, config.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    arrays = ArrayRecord({k: Array(v) for k, v in layers.items()})
    before = accountant_state(node_dir)
    message = Message(
        RecordDict({"arrays": arrays, "config": settings}),
        dst_node_id=1,
        message_type="train.encoder",
    )
    reply = app(message, deployed_context(node_dir, tiny_bert_dir))
    privacy = reply.content["privacy"]
    assert privacy["refused"] is True and "the server's encoder weights" in privacy["reason"]
    assert "arrays" not in reply.content and not reply.content["metrics"]
    assert accountant_state(node_dir) == before  # no spending


@pytest.mark.parametrize("listed", [False, True], ids=["unlisted-checkpoint", "missing-path"])
@pytest.mark.parametrize(
    "kind", ["train", "train.tuned", "evaluate", "evaluate.guard", "train.encoder"]
)
def test_a_node_refuses_a_text_model_its_policy_does_not_list_before_reading_it(
    node_dir: Path, tiny_bert_dir: Path, tmp_path: Path, kind: str, listed: bool, monkeypatch
) -> None:
    """The server names the text model a node loads: a hostile operator could make a deployed
    node read a directory of its choosing, or tell by the error an existing path from a
    missing one. A text model the node's text-models does not list is refused before anything
    is read from disk (no node data, no checkpoint built from sent layers, no spending), in
    the same words whether the path exists or not."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))

    def never(*_: object, **__: object) -> None:
        raise AssertionError("read from disk before the text model was checked")

    monkeypatch.setattr("client.request.load_node", never)
    monkeypatch.setattr("client.request.tuned_checkpoint", never)
    text_model = str(tmp_path / "missing") if listed else str(tiny_bert_dir)
    config = RunConfig(**TINY_SETTINGS, dp=True, text_model=text_model, text_finetune_layers=1)
    settings = settings_record(config, config.target_epsilon, "digest", node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    layers = ArrayRecord({"encoder.layer.1.output.dense.bias": Array(np.zeros(32, np.float32))})
    records = {"arrays": layers, "config": settings, "start": layers}
    if kind == "train.tuned":  # a model round carrying the federation's tuned layers
        records["text-encoder"], kind = layers, "train"
    before = accountant_state(node_dir)
    # listed: the node lists its own checkpoint, not the missing path the server names
    context = deployed_context(node_dir, tiny_bert_dir if listed else "minilm")
    reply = app(Message(RecordDict(records), dst_node_id=1, message_type=kind), context)
    assert not reply.has_error(), reply.error
    privacy = reply.content["privacy"]
    assert privacy["refused"] is True and privacy["node"] == "regional-0"
    shown = text_model[:40] + ("..." if len(text_model) > 40 else "")
    assert privacy["reason"] == (  # the server's own name, nothing of the node's files
        f"the request's text-model {shown!r} is not one this node's policy lets it load "
        "(text-models)"
    )
    assert "arrays" not in reply.content and not reply.content["metrics"]
    assert accountant_state(node_dir) == before
    assert not (tmp_path / "cache" / "federated-encoders").exists()


def _without(key: str):
    return lambda records: records["config"].pop(key)


def _setting(key: str, value: object):
    return lambda records: records["config"].__setitem__(key, value)


GARBAGE = ArrayRecord({"x": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"x")})


def _npy(data: bytes) -> ArrayRecord:
    """One array of ``data`` as its bytes on the wire."""
    return ArrayRecord({"x": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data)})


def _declaring(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring ``shape`` of float32, followed by 8 bytes."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - len(header) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 8


@pytest.mark.parametrize(
    "kind, change, words",
    [
        ("train", _setting("bogus", 1), "unknown setting 'bogus'"),
        ("evaluate", _setting("dim", "abc"), "setting 'dim' expects int, got 'abc'"),
        ("train", _without("server-round"), "server-round must be a whole number >= 1, got None"),
        ("evaluate.guard", _setting("server-round", "x"), "server-round must be a whole number"),
        ("train", _setting("server-round", 1.5), "got 1.5"),
        ("train.encoder", _setting("valid-fraction", 2.0), "valid-fraction must be a number"),
        ("evaluate", _setting("server-start", 0), "server-start: expected a whole number from 1"),
        ("train", _setting("target_epsilon", 0.0), "target-epsilon must be in (0, 100]"),
        ("train", _setting("device", "cuda:99"), "this machine has"),  # a device it lacks
        ("evaluate", _setting("device", "tpu"), "device must be auto, cpu, cuda or cuda:N"),
        ("train", lambda records: records.pop("config"), "server-round must be a whole number"),
        ("train", lambda records: records.pop("arrays"), "the server's message holds no arrays"),
        ("evaluate", lambda records: records.update(arrays=GARBAGE), "arrays are not tensors"),
        # no bytes at all (numpy's EOFError), and 10**12 values declared (a MemoryError): both
        # escaped as the node's own failure
        ("train", lambda records: records.update(arrays=_npy(b"")), "arrays are not tensors"),
        (
            "evaluate.guard",
            lambda records: records.update(start=_npy(_declaring((10**12,)))),
            "start are not tensors",
        ),
        ("evaluate.guard", lambda records: records.pop("start"), "message holds no start"),
        (
            "train",  # tuned encoder layers that are not the text model's top layer
            lambda records: records.update({"text-encoder": ArrayRecord({"x": Array(np.ones(2))})}),
            "the server's text-encoder: encoder weights: expected the top 1 layers'",
        ),
        ("train.encoder", _setting("text_finetune_rounds", 0), "text-finetune-rounds must be"),
        # out of range: a zero batch divided by zero deep in training, a trim of 0.5 kept no node
        ("train", _setting("local_batch_size", 0), "local-batch-size must be at least 1, got 0"),
        ("evaluate", _setting("trim_fraction", 0.5), "trim-fraction must be in [0, 0.5)"),
        ("train", _setting("seed", -1), "seed must be in [0, "),
        ("train", _setting("fusion", "xor"), "fusion must be gated, sum or concat"),
        ("train", _setting("dp_train", "all_of_it"), "dp-train must be text, bias, id or all"),
    ],
)
def test_a_malformed_message_is_refused_never_raised(
    node_dir: Path, tiny_bert_dir: Path, kind: str, change, words: str, monkeypatch
) -> None:
    """A server's message of the wrong shape (an unknown or ill-typed setting, no round or a
    round that is not a whole number, no weights, weights that are not tensors) raised out of
    the ClientApp: Flower then answered the server with the exception's text, from wherever
    the node had got to. The node now answers it with a refused report, as every other
    refusal, before anything is spent."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    config = RunConfig(
        **TINY_SETTINGS,
        device=TEST_DEVICE,
        dp=False,
        clients=2,
        text_model=str(tiny_bert_dir),
        text_finetune_layers=1,
    )
    node = load_node(str(node_dir), config.text_model)
    settings = settings_record(config, config.target_epsilon, node.catalog_digest, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    layers = top_layers(TextEncoder(config.text_model), 1)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in layers.items()})
    records = {"arrays": arrays, "config": settings, "start": arrays}
    change(records)
    before = accountant_state(node_dir)
    reply = app(
        Message(RecordDict(records), dst_node_id=1, message_type=kind),
        deployed_context(node_dir, tiny_bert_dir),
    )
    assert not reply.has_error(), reply.error
    privacy = reply.content["privacy"]
    assert privacy["refused"] is True and words in privacy["reason"], privacy
    assert "arrays" not in reply.content and not reply.content["metrics"]
    assert accountant_state(node_dir) == before


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_what_a_node_ran_into_stays_in_its_log(
    node_dir: Path, tiny_bert_dir: Path, kind: str, monkeypatch, caplog
) -> None:
    """A node's own failure (here its data: a data error quotes the file, the row and the
    value) raised out of the ClientApp, and Flower sent the server the exception's text. The
    server now learns only that the node failed; the node's log keeps the reason."""
    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    secret = "customer 'alice@example.com' bought item 'x' twice at one time"

    def broken_data(directory: str, text_model: str):
        raise DataError(Path(directory) / "events.csv", secret, row=7)

    monkeypatch.setattr("client.request.load_node", broken_data)
    config = RunConfig(**TINY_SETTINGS, device=TEST_DEVICE, dp=True, text_model=str(tiny_bert_dir))
    settings = settings_record(config, config.target_epsilon, "0" * 64, node_dir.parent)
    settings["run-id"], settings["server-round"] = "0" * 64, 1
    message = Message(
        RecordDict({"arrays": ArrayRecord({}), "config": settings}),
        dst_node_id=1,
        message_type=kind,
    )
    with pytest.raises(client_app.NodeFailed) as failure:
        app(message, deployed_context(node_dir, tiny_bert_dir))
    assert "alice" not in str(failure.value) and str(node_dir) not in str(failure.value)
    assert failure.value.__cause__ is None and failure.value.__suppress_context__
    assert secret in caplog.text  # the node's operator still reads why
