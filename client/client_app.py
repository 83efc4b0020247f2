"""Flower ClientApp: a merchant or regional node trains on its own data, returns only weights.

Where the node's data is: ``data-dir`` in the node config (deployment:
``flower-supernode --node-config "data-dir=/path"``), else ``<partitions-dir>/node-<partition-id>``
(simulation, where Flower sets ``partition-id``). The node's privacy policy comes from its node
config too (client/policy.py), never from the server's messages.

Every privacy report a node sends is signed with its node key (``node-key`` in the node config,
default ``<data dir>/privacy/node.key``), together with a digest of the update it carries, and
kept in the node's own receipt log (``<data dir>/privacy/receipts.jsonl``) before it leaves.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.client import NumPyClient

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

# deprecated path; SecAgg+ exists nowhere else in flwr 1.42
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.accountant import NodePrivacy, RequestPosition
from client.encoder import tune_encoder_at_node
from client.node import (
    NodeData,
    evaluate_node,
    guard_node,
    load_node,
    public_customers,
    train_node,
)
from client.policy import NodePolicy
from shared.federation.node_directory import node_name
from shared.federation.node_dp import clipped_update
from shared.federation.reports import NodeReport, Release, server_start_problem
from shared.federation.signing import SIGNED_FIELDS, NodeKey, append_receipt, digest_arrays
from shared.federation.wire import COUNTS, counts_record, encode, nbytes, weights_problem
from shared.recommender.finetune import tuned_checkpoint
from shared.runs.config import RunConfig, resolve_device
from shared.runs.quiet import quiet_third_party

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"[0-9a-f]{64}")  # a run's id: the sha256 of its first ledger entry
MAX_REASON = 300  # characters of a malformed message's error a refusal repeats
# what the server sends beside the run's settings
NOT_SETTINGS = (
    "server-round",
    "partitions-dir",
    "state-names",
    "run-id",
    "server-start",
    "catalog-digest",
    "valid-fraction",
)


def node_directory(settings: dict, node_config: dict) -> str:
    """This node's data: its ``data-dir`` (deployment) or its partition (simulation)."""
    if "data-dir" in node_config:
        return str(node_config["data-dir"])
    partitions = settings["partitions-dir"]
    return str(Path(partitions) / f"node-{node_config['partition-id']}")


def valid_fraction(settings: dict) -> float:
    """The share of customers whose validation event the node holds out (they choose the
    rounds); a value that is not a number in [0, 1] is refused with what it was."""
    value = settings.get("valid-fraction", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"valid-fraction must be a number in [0, 1], got {value!r}")
    return float(value)


class RequestRefused(Exception):
    """A server's message the node refuses before it reads anything of its own for it: a
    malformed message, or one naming a text model its policy does not let it load; answered
    with a refused report (:func:`answering_refusals`), as every other refusal."""

    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.report = NodeReport(node, refused=True, reason=reason)


def server_round(settings: dict) -> int:
    """The round the server names (``server-round``, a whole number >= 1: the order in which
    the node charges a run's requests); anything else is refused with what it was."""
    value = settings.get("server-round")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = repr(value)[:40]
        raise ValueError(f"server-round must be a whole number >= 1, got {shown}")
    return value


def server_start(settings: dict) -> int | None:
    """The server start that sends the request (``server-start``: 1 at the run's first, one
    more at each resume; the node charges a run's requests in the order of their starts, then
    rounds); None from a server that numbers none. Anything else than a server start
    (``server_start_problem``, shared/federation/reports.py) is refused with what it was."""
    value = settings.get("server-start")
    if value is not None and (problem := server_start_problem(value)):
        raise ValueError(f"server-start: {problem}"[:MAX_REASON])
    return value


class NodeRequest:
    """One message from the server, read on the node's side: the run's settings, this node's
    data, its own policy and key, and the round. A malformed message, or one naming a text
    model the node's policy does not allow, raises :class:`RequestRefused` before anything is
    loaded from disk."""

    def __init__(
        self,
        settings: dict,
        node_config: dict,
        text_encoder: ArrayRecord | None = None,
    ):
        directory = node_directory(settings, node_config)
        self.name = node_name(Path(directory))
        self.policy = NodePolicy.from_node_config(node_config)
        try:
            self.config = RunConfig.from_flat(
                {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
            )
            self.round = server_round(settings)
            self.start = server_start(settings)
            self.valid_fraction = valid_fraction(settings)
            resolve_device(self.config.device)  # a device this node has
        except ValueError as error:
            shown = str(error)[:MAX_REASON] + ("..." if len(str(error)) > MAX_REASON else "")
            raise RequestRefused(self.name, f"the server's message: {shown}") from None
        text_model = self.config.text_model
        if reason := self.policy.text_model_refusal(text_model):  # before it is read
            raise RequestRefused(self.name, reason)
        torch.set_num_threads(max(1, int(node_config.get("num-threads", 1))))
        torch.set_flush_denormal(True)
        encoder = None if text_encoder is None else self.tensors(text_encoder, "text-encoder")
        # the tuned encoder layers the server sent, refused as any weights it sends
        self.encoder_problem = None if encoder is None else weights_problem(encoder)
        if encoder is not None and self.encoder_problem is None:
            # the federation's tuned layers on the allowed base: the same encoder as all
            layers = self.config.text_finetune_layers
            try:
                text_model = str(tuned_checkpoint(text_model, encoder, layers))
            except ValueError as error:  # not the top layers of the run's text model
                raise RequestRefused(self.name, f"the server's text-encoder: {error}") from None
            except OSError:  # a full disk, say: refused, never an error naming the node's paths
                reason = "the server's text-encoder: the node could not store it"
                raise RequestRefused(self.name, reason) from None
        self.node: NodeData = load_node(directory, text_model)
        self.run_id = str(settings.get("run-id", ""))
        self.catalog_digest = str(settings.get("catalog-digest", ""))
        key_path = node_config.get("node-key") or self.node.directory / "privacy" / "node.key"
        self.key_path = Path(key_path)

    def tensors(self, record: ArrayRecord, name: str) -> dict[str, torch.Tensor]:
        """The arrays of ``record`` (the server's ``name``) as tensors; arrays that cannot be
        read as tensors are refused (:class:`RequestRefused`): among them an array of no bytes
        (numpy's EOFError) and one whose header declares more values than memory holds
        (MemoryError, before a byte is read: 10**12 values asked for 3.6 TiB)."""
        try:
            return record.to_torch_state_dict()
        except (TypeError, ValueError, EOFError, MemoryError):
            raise RequestRefused(self.name, f"the server's {name} are not tensors") from None

    def received(self, msg: Message, name: str = "arrays") -> dict[str, torch.Tensor]:
        """The weights the server sent as ``name``; a message without them is refused."""
        record = msg.content.array_records.get(name)
        if record is None:
            raise RequestRefused(self.name, f"the server's message holds no {name}")
        return self.tensors(record, name)

    def position(self, phase: int = 1) -> RequestPosition:
        """This request's place in its run (its server start; phase 0: an encoder round, 1:
        the model's rounds; its round), in which order the node charges private requests
        (client/accountant.py)."""
        return RequestPosition(self.run_id, phase, self.round, self.start or 0)

    def weights_refusal(self, *states: dict[str, torch.Tensor]) -> dict | None:
        """A refusal when a model the server sent (its weights, the start's, the tuned encoder
        layers) is not finite or beyond :data:`MAX_WEIGHT`, else None. Such weights can make
        one customer's scores or gradient non-finite, which DP-SGD's clipping does not bound:
        whether a release is NaN would then say whether a customer bought a given product. The
        refusal depends on the server's message alone, never on the node's data."""
        problems = [weights_problem(state) for state in states]
        reason = self.encoder_problem or next((p for p in problems if p), None)
        if not reason:
            return None
        return {"node": self.name, "refused": True, "reason": reason}

    def request_refusal(self, training: bool = True) -> dict | None:
        """A refusal when the request does not name its run as the server names every run
        (``run-id``: the sha256 hex digest of the run's first ledger entry, which every signed
        release and receipt of this node carries; free text of any size is refused), when the
        model it asks for holds more weights than the node's ``max-model-weights`` or its steps
        (``training`` false: an evaluation's, which takes no training step) more activations
        than its ``max-step-activations`` (both counted before anything is built or charged),
        or when this node holds another catalog than the server's (the
        global model's item tables would not mean the same products), else None."""
        if not RUN_ID.fullmatch(self.run_id):
            shown = self.run_id[:16] + ("..." if len(self.run_id) > 16 else "")
            reason = (
                f"run-id {shown!r} ({len(self.run_id)} characters) is not a run's id: 64 "
                "lowercase hex digits, the hash of the run's first ledger entry"
            )
            return {"node": self.name, "refused": True, "reason": reason}
        model = self.config.model_config(len(self.node.text), self.node.text.shape[1])
        customers = public_customers(self.node, self.policy)
        if reason := self.policy.model_refusal(model) or self.policy.step_refusal(
            self.config, model, customers, training
        ):
            return {"node": self.name, "refused": True, "reason": reason}
        if not self.catalog_digest or self.catalog_digest == self.node.catalog_digest:
            return None
        reason = (
            f"this node's catalog (sha256 {self.node.catalog_digest[:12]}) is not the "
            f"server's ({self.catalog_digest[:12]}): every party must hold the same items table"
        )
        return {"node": self.name, "refused": True, "reason": reason}

    def trained(self, state: dict[str, torch.Tensor], valid_fraction: float) -> dict:
        """The node's answer to a training request from the global ``state``: a refusal of the
        request or its weights, or :func:`train_node`'s result (``valid_fraction`` of the
        customers' validation events held out)."""
        return (
            self.request_refusal()
            or self.weights_refusal(state)
            or train_node(
                self.node,
                self.config,
                state,
                self.round,
                self.policy,
                valid_fraction,
                self.position(),
            )
        )

    def report(self, result: dict, arrays: dict[str, np.ndarray] | None) -> NodeReport:
        """The privacy report for ``result``: a refusal or a decline as it is; a DP release
        signed with the node key over its fields, the digest of ``arrays`` and whether the
        node vouches that its customers are its own alone (client/policy.py,
        ``exclusive-customers``) and the server start that asked (where the server numbers
        its starts), and kept in the node's receipt log before it leaves."""
        name = self.name
        if result.get("refused") or result.get("declined"):
            return NodeReport(
                name,
                refused=bool(result.get("refused")),
                declined=bool(result.get("declined")),
                reason=str(result["reason"]),
                epsilon=result.get("epsilon"),
            )
        if "mechanism" not in result:  # no DP: nothing was spent, nothing to sign
            return NodeReport(name)
        release = Release(
            **{
                **{k: result[k] for k in SIGNED_FIELDS if k in result},
                "run_id": self.run_id,
                "round": self.round,
                "node": name,
                "num_customers": int(result["customers"]),
                "update_digest": digest_arrays(arrays) if arrays is not None else "",
                "exclusive_customers": self.policy.exclusive(self.node.partition),
                "server_start": self.start,
            }
        )
        key = NodeKey.load_or_create(self.key_path)
        receipt = append_receipt(NodePrivacy(self.node.directory).receipts, release.as_dict(), key)
        return NodeReport(
            name,
            release=release,
            signature=receipt["signature"],
            key_id=key.key_id,
            public_key=key.public_pem,
        )


def sent_settings(msg: Message) -> dict:
    """The run's settings a message carries (``config``); none is a message without a round,
    which :class:`NodeRequest` refuses."""
    record = msg.content.config_records.get("config")
    return {} if record is None else dict(record)


class NodeFailed(RuntimeError):
    """All the server learns of a node's own failure: that it failed, not why. The reason can
    quote the node's files, rows or values (a data error names them); it stays in the node's
    log, and Flower sends the server only this exception's text."""


def answering_refusals(handler: ClientAppCallable) -> ClientAppCallable:
    """``handler``, a message it refuses before reading anything for it
    (:class:`RequestRefused`) answered with the refused report, as every other refusal: a
    hostile message gets a refusal, never an error that repeats what the node ran into. Any
    other failure is logged here in full and reaches the server as :class:`NodeFailed`; what
    it had charged stays charged (the accountant writes before a release leaves)."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except RequestRefused as refusal:
            privacy = ConfigRecord(refusal.report.to_record())
            content = RecordDict({"privacy": privacy, "metrics": MetricRecord({})})
            return Message(content=content, reply_to=msg)
        except Exception:
            log.exception("the node could not answer a %s message", msg.metadata.message_type)
            raise NodeFailed("the node failed; the reason is in its own log") from None

    return answer


def refusing_node(context: Context) -> str:
    """This node's name in a refusal of a message that names no data directory of its own: its
    ``data-dir``'s (deployment), else its partition's (simulation)."""
    try:
        return node_name(Path(context.node_config["data-dir"]))
    except (KeyError, OSError, ValueError):
        return f"node-{context.node_config.get('partition-id', '?')}"


def secagg_setup_refusal(msg: Message, policy: NodePolicy) -> str | None:
    """Why the node refuses ``msg`` when it is a SecAgg+ setup asking for more shares, or a
    higher threshold, than the node's ``max-secagg-shares``, or a threshold of at most half
    its shares (None otherwise): read before Flower's ``secaggplus_mod`` makes a key, its work
    growing with both. At half or less, a server telling two disjoint groups of nodes different
    stories (to one that a node dropped, to the other that it is active) gathers enough shares
    of both of that node's secrets to unmask its own update; above half, two disjoint groups
    cannot both reach the threshold (server/federation/secagg.py asks for two thirds)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
    if configs.get(Key.STAGE) != Stage.SETUP or not (
        isinstance(shares, int) and isinstance(threshold, int)
    ):
        return None  # no setup, or one Flower's own checks refuse
    refusal = policy.secagg_refusal(shares, threshold)
    if refusal is None and 2 * threshold <= shares:
        refusal = (
            f"a SecAgg+ threshold of {threshold} of {shares} shares (at most half) would let "
            "a server reconstruct both secrets of one node from two disjoint groups"
        )
    return refusal


def secagg_list_refusal(msg: Message) -> str | None:
    """Why the node refuses ``msg`` when its node lists are ones no honest SecAgg+ server
    sends (None otherwise): a source twice in the masking step (Flower's mod adds a pairwise
    mask over the whole model for each entry: a node's copies of one ciphertext, forwarded,
    made that work unbounded), or a node both active and dropped in the unmasking step (the
    node would reveal its share of both of that node's secrets: with enough such shares the
    server unmasks that node's own update)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage, sources = configs.get(Key.STAGE), configs.get(Key.SOURCE_LIST)
    twice = isinstance(sources, list) and len(set(sources)) < len(sources)
    if stage == Stage.COLLECT_MASKED_VECTORS and twice:
        return "the SecAgg+ masking step names a source node more than once"
    active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    dropped = set(dead) if isinstance(dead, list) else set()
    if (
        stage == Stage.UNMASK
        and isinstance(active, list)
        and (both := sorted(dropped.intersection(active), key=str))
    ):
        return f"the SecAgg+ unmasking step names node(s) {both[:5]} both active and dropped"
    return None


def rehearsed(node_config: dict) -> Mod:
    """``secaggplus_mod``, with a SecAgg+ message it cannot take refused
    (:class:`RequestRefused`) before the node trains or spends: a setup above the node's
    ``max-secagg-shares`` (its policy, ``node_config`` added to its own config), or node lists
    no honest server sends (:func:`secagg_list_refusal`), at once; each
    step of the protocol is then first taken on copies of the message and of the node's
    SecAgg+ state, an empty update in place of the node's (Flower's own checks of the stage,
    the keys, the shares and the ciphertexts), and only a message that passes is answered for
    real."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        policy = NodePolicy.from_node_config({**context.node_config, **node_config})
        if reason := secagg_setup_refusal(msg, policy) or secagg_list_refusal(msg):
            raise RequestRefused(refusing_node(context), reason)
        try:
            secaggplus_mod(copy.deepcopy(msg), copy.deepcopy(context), _no_update)
        except Exception as error:  # noqa: BLE001 (whatever the server's message makes it raise)
            shown = str(error)[:MAX_REASON] + ("..." if len(str(error)) > MAX_REASON else "")
            reason = f"the server's SecAgg+ message: {shown}"
            raise RequestRefused(refusing_node(context), reason) from None
        return secaggplus_mod(msg, context, call_next)

    return mod


class _NoUpdate(NumPyClient):
    """A node that sends no weights: what :func:`rehearsed` masks."""

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        return [], 1, {}


_no_update = ClientApp(client_fn=lambda context: _NoUpdate().to_client())


def make_client_app(node_config: dict | None = None) -> ClientApp:
    """The ClientApp; ``node_config`` is added to each node's own config (how ``fedrec
    simulate`` gives its simulated nodes the policy of ``--node-config``)."""
    quiet_third_party()  # in Ray's workers too: Opacus's import sends Flower's logs to the root
    extra = dict(node_config or {})
    app = ClientApp()

    def request(settings: dict, context: Context, msg: Message | None = None) -> NodeRequest:
        encoder = None if msg is None else msg.content.array_records.get("text-encoder")
        return NodeRequest(settings, {**context.node_config, **extra}, encoder)

    class SecureNode(NumPyClient):
        """A node's side of a SecAgg+ round (server/federation/secagg.py): it sends its clipped
        update (a delta, dense), masked by ``secaggplus_mod``, and its privacy report in plain."""

        def __init__(self, context: Context):
            self.node_context = context

        def sent_state(self, parameters: list[np.ndarray], config: dict) -> dict:
            """The weights sent, named by the message's ``state-names``; refused (before
            anything is spent) when they are not that many arrays of numbers."""
            names = config.get("state-names")
            names = names.split(",") if isinstance(names, str) else []
            try:
                if len(set(names)) != len(parameters):  # one distinct name an array
                    raise ValueError
                return dict(zip(names, map(torch.tensor, parameters), strict=True))
            except (TypeError, ValueError, RuntimeError):
                reason = "the server's SecAgg+ message: its weights are not its state-names'"
                raise RequestRefused(refusing_node(self.node_context), reason) from None

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
            state = self.sent_state(parameters, config)
            try:
                asked = request(dict(config), self.node_context)
            except RequestRefused as refusal:  # a zero update, still in the protocol
                zeros = [np.zeros(value.shape, np.float32) for value in state.values()]
                return zeros, 1, refusal.report.to_record()
            result = asked.trained(state, valid_fraction=0.0)
            if result.get("refused") or result.get(
                "declined"
            ):  # a zero update, still in the protocol
                update = {name: np.zeros(value.shape, np.float32) for name, value in state.items()}
            else:
                update = clipped_update(result["state"], state, asked.config)
            metrics = asked.report(result, update).to_record()
            return [update[name] for name in state], 1, metrics  # every node weighs 1

    secure_app = answering_refusals(
        ClientApp(
            client_fn=lambda context: SecureNode(context).to_client(), mods=[rehearsed(extra)]
        )
    )

    def secure_rounds(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Hands the messages of a SecAgg+ round to ``secure_app``, every other one on."""
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secure_app(msg, context)
        return call_next(msg, context)

    @app.train(mods=[secure_rounds])
    @answering_refusals
    def train(msg: Message, context: Context) -> Message:
        """Train locally from the global weights; reply with weights, metrics and privacy spent."""
        asked = request(sent_settings(msg), context, msg)
        state = asked.received(msg)
        result = asked.trained(state, asked.valid_fraction)
        metrics: dict[str, Any] = {}
        arrays = None
        if not (result.get("refused") or result.get("declined")):
            config = asked.config
            sent, rows = result["state"], result["rows"]
            if config.node_dp:  # dense and clipped: which rows it sends is private at node level
                update = clipped_update(sent, state, config)
                sent = {k: v.float() + torch.from_numpy(update[k]) for k, v in state.items()}
                rows = None
            arrays = encode(sent, rows, dtype=config.wire_dtype)
            metrics = {"num-examples": int(result["customers"]), "bytes-up": nbytes(arrays)}
            if not (config.dp or config.node_dp):  # under DP only the weights leave the node
                metrics["loss"] = result["loss"]
                metrics["reversed-histories"] = int(result["reversed"])
        content = RecordDict(
            {
                "privacy": ConfigRecord(asked.report(result, arrays).to_record()),
                "metrics": MetricRecord(metrics),
            }
        )
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        if COUNTS in result:  # without DP, for the server's popularity prior
            content[COUNTS] = counts_record(result[COUNTS])
        return Message(content=content, reply_to=msg)

    @app.train("encoder")
    @answering_refusals
    def train_encoder(msg: Message, context: Context) -> Message:
        """An encoder round: tune the text encoder's top layers on the node's own histories
        (client/encoder.py), privately under DP; reply with the layers, how many customers
        they came from and, under DP, the signed release."""
        asked = request(sent_settings(msg), context)
        weights = asked.received(msg)
        result = (
            asked.request_refusal()
            or asked.weights_refusal(weights)
            or tune_encoder_at_node(
                asked.node,
                asked.config,
                weights,
                asked.round,
                asked.policy,
                asked.valid_fraction,
                asked.position(phase=0),
            )
        )
        arrays = None
        metrics: dict[str, Any] = {}
        if "state" in result:
            arrays = {k: v.numpy() for k, v in result["state"].items()}
            metrics = {"num-examples": result["customers"], "bytes-up": nbytes(arrays)}
            if not asked.config.dp:  # under DP only the layers leave the node
                metrics["loss"] = result["loss"]
        content = RecordDict(
            {
                "privacy": ConfigRecord(asked.report(result, arrays).to_record()),
                "metrics": MetricRecord(metrics),
            }
        )
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @answering_refusals
    def evaluate(msg: Message, context: Context) -> Message:
        """Federated evaluation of the global model on the node's local holdout: exact without
        DP, noisy and charged to the node's accountant under DP."""
        asked = request(sent_settings(msg), context, msg)
        state = asked.received(msg)
        result = (
            asked.request_refusal(training=False)
            or asked.weights_refusal(state)
            or evaluate_node(
                asked.node,
                asked.config,
                state,
                asked.policy,
                asked.valid_fraction,
                asked.position(),
            )
        )
        privacy = asked.report(result, None).to_record()
        counts = ("customers", "valid-customers")
        metrics = {
            k: v
            for k, v in result.items()
            if k in counts and "mechanism" not in result or k.startswith("noisy_") or "@" in k
        }
        content = RecordDict({"privacy": ConfigRecord(privacy), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate("guard")
    @answering_refusals
    def guard(msg: Message, context: Context) -> Message:
        """The start guard (``dp-guard``): the node's private comparison of the global model
        (``arrays``) with the public start (``start``) on its customers' held-out last events."""
        asked = request(sent_settings(msg), context, msg)
        state = asked.received(msg)
        start = asked.received(msg, "start")
        result = (
            asked.request_refusal(training=False)
            or asked.weights_refusal(state, start)
            or guard_node(asked.node, asked.config, state, start, asked.policy, asked.position())
        )
        privacy = asked.report(result, None).to_record()
        metrics = {k: v for k, v in result.items() if k == "noisy_gain"}
        content = RecordDict({"privacy": ConfigRecord(privacy), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
