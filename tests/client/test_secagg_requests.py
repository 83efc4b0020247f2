"""A node's side of SecAgg+ (client/client_app.py): a server's SecAgg+ message the node cannot
take is refused, with the node's usual refusal reply, before it trains or spends anything; the
node answers the next message as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from helpers import metadata

from client.client_app import make_client_app
from shared.federation.node_directory import NodeInfo

NODE_ID = 5
SETUP = {
    Key.STAGE: Stage.SETUP,
    Key.SAMPLE_NUMBER: 2,
    Key.SHARE_NUMBER: 2,
    Key.THRESHOLD: 1,
    Key.CLIPPING_RANGE: 3.0,
    Key.TARGET_RANGE: 2**22,
    Key.MOD_RANGE: 2**32,
    Key.MAX_WEIGHT: 1.0,
}


def secagg_message(configs: dict) -> Message:
    """A SecAgg+ message of the server to node ``NODE_ID`` carrying ``configs``."""
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)})
    return Message(content=content, metadata=metadata(0, NODE_ID))


@pytest.fixture
def node(tmp_path: Path) -> tuple[Context, Path]:
    """A deployed node's context (its data directory holds only its node.json)."""
    NodeInfo("north", "regional", None, 100).write(tmp_path)
    context = Context(
        run_id=1,
        node_id=NODE_ID,
        node_config={"data-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    return context, tmp_path


def refused(reply: Message) -> str:
    """The reason of the refusal ``reply`` is (failing when it is none)."""
    privacy = dict(reply.content.config_records["privacy"])
    assert privacy["refused"] is True and privacy["node"] == "north", privacy
    return str(privacy["reason"])


HOSTILE = {
    "no stage": {},
    "a stage that is no text": {Key.STAGE: 3},
    "an unknown stage": {Key.STAGE: "exfiltrate"},
    "a stage out of order": {Key.STAGE: Stage.COLLECT_MASKED_VECTORS},
    "a setup without its numbers": {Key.STAGE: Stage.SETUP},
    "a setup of the wrong types": {**SETUP, Key.THRESHOLD: "1"},
    "a setup without max weight": {k: v for k, v in SETUP.items() if k != Key.MAX_WEIGHT},
}


@pytest.mark.parametrize("configs", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_malformed_secagg_message_is_refused_not_a_node_failure(node, configs: dict) -> None:
    """Each of these raised out of Flower's secaggplus_mod (KeyError, TypeError, ValueError):
    the node answered with a node failure, not its refusal."""
    context, directory = node
    app = make_client_app()
    reason = refused(app(secagg_message(configs), context))
    assert reason.startswith("the server's SecAgg+ message: ")
    assert not (directory / "privacy").exists()  # nothing charged, no key, no receipt
    reply = app(secagg_message(SETUP), context)  # the node still follows the protocol
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]


def test_hostile_keys_after_a_setup_are_refused_and_leave_the_protocol_state(node) -> None:
    """The share-keys step with another node's key that is no key (the node's own is echoed):
    refused, and the node's SecAgg+ state is still the one its setup left."""
    context, _ = node
    app = make_client_app()
    keys = app(secagg_message(SETUP), context).content.config_records[RECORD_KEY_CONFIGS]
    own = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
    state = dict(context.state.config_records[RECORD_KEY_STATE])
    hostile = {Key.STAGE: Stage.SHARE_KEYS, str(NODE_ID): own, "7": [b"not a key", b"nor this"]}
    assert "SecAgg+" in refused(app(secagg_message(hostile), context))
    assert dict(context.state.config_records[RECORD_KEY_STATE]) == state
