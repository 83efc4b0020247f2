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

from client import client_app
from client.client_app import make_client_app
from client.policy import NodePolicy
from server.federation.secagg import RECONSTRUCTION_THRESHOLD
from shared.federation.node_directory import NodeInfo

NODE_ID = 5
SETUP = {
    Key.STAGE: Stage.SETUP,
    Key.SAMPLE_NUMBER: 2,
    Key.SHARE_NUMBER: 2,
    Key.THRESHOLD: 2,
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


@pytest.mark.parametrize(
    "asked",
    [{Key.SHARE_NUMBER: 10**6}, {Key.SHARE_NUMBER: 10**6, Key.THRESHOLD: 10**6}],
    ids=["shares", "threshold"],
)
def test_a_setup_above_the_nodes_share_cap_is_refused_before_any_work(
    node, monkeypatch: pytest.MonkeyPatch, asked: dict
) -> None:
    """A setup of a million shares passed Flower's checks: the node split its secrets a
    million ways at the next step (twice, with its rehearsal). It is refused by the node's
    max-secagg-shares before Flower's mod is called at all, nothing spent."""
    context, directory = node
    app = make_client_app()
    calls = []
    monkeypatch.setattr(client_app, "secaggplus_mod", lambda *args: calls.append(args))
    reason = refused(app(secagg_message({**SETUP, **asked}), context))
    assert "max-secagg-shares=200" in reason and f"{asked[Key.SHARE_NUMBER]} shares" in reason
    assert calls == [] and not (directory / "privacy").exists()


@pytest.mark.parametrize(("shares", "threshold"), [(4, 2), (100, 50), (3, 1)])
def test_a_setup_whose_threshold_is_at_most_half_its_shares_is_refused(
    node, monkeypatch: pytest.MonkeyPatch, shares: int, threshold: int
) -> None:
    """At a threshold of half the shares or less, a server telling one group of nodes that a
    node dropped and a disjoint group that it is active gathers enough shares of both of its
    secrets (the pairwise key and the mask seed) to unmask that node's own update: refused
    before Flower's mod is called, nothing spent. fedrec's own server asks for two thirds."""
    context, directory = node
    calls = []
    monkeypatch.setattr(client_app, "secaggplus_mod", lambda *args: calls.append(args))
    asked = {**SETUP, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold}
    reason = refused(make_client_app()(secagg_message(asked), context))
    assert f"threshold of {threshold} of {shares} shares" in reason
    assert calls == [] and not (directory / "privacy").exists()
    assert 2 * round(RECONSTRUCTION_THRESHOLD * shares) > shares  # what fedrec's server asks


def test_an_honest_setup_within_the_cap_is_answered(node) -> None:
    """The cap's own value is accepted (fedrec's server asks for one share a sampled node, half
    of them to reconstruct); a node's max-secagg-shares lowers it, a simulated node has none."""
    context, _ = node
    at_cap = {**SETUP, Key.SHARE_NUMBER: 200, Key.THRESHOLD: 133}
    reply = make_client_app()(secagg_message(at_cap), context)
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    strict = make_client_app({"max-secagg-shares": 199})
    assert "max-secagg-shares=199" in refused(strict(secagg_message(at_cap), context))
    simulated = Context(
        run_id=1, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    million = {**SETUP, Key.SHARE_NUMBER: 10**6, Key.THRESHOLD: 10**6 // 2 + 1}
    reply = make_client_app()(secagg_message(million), simulated)
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]


def test_max_secagg_shares_bounds_a_secagg_setup() -> None:
    """Shares and threshold alike, from the node's own config; a simulated node has no cap."""
    deployed = NodePolicy.from_node_config({"data-dir": "/d"})
    assert deployed.secagg_refusal(200, 100) is None
    assert "max-secagg-shares=200" in str(deployed.secagg_refusal(201, 2))
    tight = NodePolicy.from_node_config({"data-dir": "/d", "max-secagg-shares": "10"})
    assert "threshold 11" in str(tight.secagg_refusal(5, 11))
    assert NodePolicy().secagg_refusal(10**6, 10**6) is None


LISTS = {
    "a source twice": {
        Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
        Key.CIPHERTEXT_LIST: [b"c"] * 3,
        Key.SOURCE_LIST: [7, 7, 8],
    },
    "a node active and dropped": {
        Key.STAGE: Stage.UNMASK,
        Key.ACTIVE_NODE_ID_LIST: [NODE_ID, 7, 8],
        Key.DEAD_NODE_ID_LIST: [8],
    },
}


@pytest.mark.parametrize("configs", LISTS.values(), ids=LISTS.keys())
def test_node_lists_no_honest_server_sends_are_refused_before_any_work(
    node, monkeypatch: pytest.MonkeyPatch, configs: dict
) -> None:
    """Flower's mod took both: a source named n times cost n pairwise masks over the whole
    model (after training; a node's copies of its ciphertext, forwarded, suffice), and a node
    both active and dropped had its mask-seed share and its key share revealed together (with
    enough of both, the server unmasks its own update). Refused before Flower's mod runs."""
    context, directory = node
    calls = []
    monkeypatch.setattr(client_app, "secaggplus_mod", lambda *args: calls.append(args))
    reason = refused(make_client_app()(secagg_message(configs), context))
    assert "more than once" in reason or "[8] both active and dropped" in reason
    assert calls == [] and not (directory / "privacy").exists()
