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

from client.encoder import tune_encoder_at_node
from client.node import evaluate_node, guard_node
from client.policy import NodePolicy
from client.request import MAX_REASON, NodeRequest, RequestRefused, sent_settings
from shared.federation.node_directory import node_name
from shared.federation.node_dp import clipped_update
from shared.federation.wire import COUNTS, counts_record, encode, nbytes
from shared.runs.quiet import quiet_third_party

log = logging.getLogger(__name__)


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

    def request(
        settings: dict, context: Context, msg: Message | None = None, first_round: int = 1
    ) -> NodeRequest:
        encoder = None if msg is None else msg.content.array_records.get("text-encoder")
        return NodeRequest(settings, {**context.node_config, **extra}, encoder, first_round)

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
        DP, noisy and charged to the node's accountant under DP. Round 0 is the public start's
        (a deployment's nodes validate it as a candidate: server/federation/rounds.py),
        answered and charged exactly as any other round's."""
        asked = request(sent_settings(msg), context, msg, first_round=0)
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
