"""A server's message read on the node's side (:class:`NodeRequest`): the run's settings, the
node's own data, policy and key, and the round; a malformed message, or one the node's policy
does not allow, is refused (:class:`RequestRefused`) before anything is loaded from disk. The
Flower handlers that answer it are client/client_app.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from client.accountant import NodePrivacy, RequestPosition
from client.node import NodeData, load_node, public_customers, train_node
from client.policy import NodePolicy
from shared.federation.node_directory import node_name
from shared.federation.reports import NodeReport, Release, server_start_problem
from shared.federation.signing import SIGNED_FIELDS, NodeKey, append_receipt, digest_arrays
from shared.federation.wire import weights_problem
from shared.recommender.finetune import tuned_checkpoint
from shared.runs.config import RunConfig, resolve_device

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


def server_round(settings: dict, first: int = 1) -> int:
    """The round the server names (``server-round``, a whole number >= ``first``: the order in
    which the node charges a run's requests; 0 only for an evaluation, round 0 being the public
    start's); anything else is refused with what it was."""
    value = settings.get("server-round")
    if isinstance(value, bool) or not isinstance(value, int) or value < first:
        shown = repr(value)[:40]
        raise ValueError(f"server-round must be a whole number >= {first}, got {shown}")
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
    data, its own policy and key, and the round (at least ``first_round``: 0 for an
    evaluation, whose round 0 is the public start's). A malformed message, or one naming a text
    model the node's policy does not allow, raises :class:`RequestRefused` before anything is
    loaded from disk."""

    def __init__(
        self,
        settings: dict,
        node_config: dict,
        text_encoder: ArrayRecord | None = None,
        first_round: int = 1,
    ):
        directory = node_directory(settings, node_config)
        self.name = node_name(Path(directory))
        self.policy = NodePolicy.from_node_config(node_config)
        try:
            self.config = RunConfig.from_flat(
                {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
            )
            self.round = server_round(settings, first_round)
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
