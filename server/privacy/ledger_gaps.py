"""Spending whose reply never reached the ledger: recorded when the node next contributes.

A node writes its accountant to disk before its update leaves it, so a server stopped mid-round
can lose a reply whose privacy was already spent. The node's next contribution then shows a gap
in its ``contribution_index``. Each missing contribution is appended before that next one, with
its parameters (fixed for a node within a run: its noise multiplier is calibrated once, its
sample rate and steps follow from its data and the run's settings, which a resumed run may not
change) and the cumulative epsilon they compose to, marked ``recovered``. The ledger then never
holds less spending than the nodes' accountants, and the audit's index check still holds.

A reply that never comes (the node stopped, the network dropped it, the round timed out, the
run ended) may still have been spent. The server records each private request a node did not
answer as ``unanswered``; until a recovered contribution or one of a later round settles it
(:func:`outstanding_requests`), it counts as spent, in the run's statement and in the audit:
at the node's costliest release of its purpose, or where no release of the node bounds it, at
no less than the run's target (:func:`outstanding_releases`). A run that ends with a reply
lost therefore states at least what was spent.

A run stopped (Ctrl-C, SIGTERM) or killed mid-exchange records no ``unanswered`` entry: the
server writes ahead instead. Before a private request leaves, a ``requested`` entry names the
nodes it goes to; once the exchange's replies (and unanswered requests) are recorded, an
``answered`` entry closes it. A ``requested`` entry never closed was in flight when the server
stopped: each of its nodes counts as spent, as an unanswered request does, until the node's
next signed contribution whose index shows no gap settles it, whatever its round (its index
says the node charged nothing more, and the rerun asks the same round again), or a recovered
contribution does (the node had charged it). A node the server had not yet heard from has no
name to be settled by: such requests are settled once as many nodes as the run has
(``num_nodes``) have each released so, after it (:func:`in_flight`).

A killed server's request can still be in a deployed node's hands when the restarted server
asks the same round again. So each server start is numbered (1 at the run's first, one more
at each resume: a ``resumed`` entry before its first private request, :func:`server_starts`),
the number goes with every request and the node signs it into its release
(``server_start``), and the node charges a run's requests in the order of their starts, then
rounds (client/accountant.py): once it charged a later start's request it refuses an earlier
start's, spending nothing. A release settles a request in flight only when it is signed for a
later start than the one that asked (a release that states no start, in a ledger of before
starts were numbered, settles it as before; a numbered server accepts none).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from server.privacy.accounting import epsilon_curve, recompute_epsilon
from server.privacy.ledger import PrivacyLedger
from shared.federation.signing import SERVER_START
from shared.runs.rounding import up

log = logging.getLogger("fedrec.server")
DP_SGD = ("training", "encoder")  # the purposes of DP-SGD releases (the others: one answer)

NO_REPLY = "no reply (the node stopped, its reply was lost, or the round timed out)"
# the purpose of the release each request stage asks for (the stages: server/federation/)
STAGE_PURPOSE = {
    "train": "training",
    "train.encoder": "encoder",
    "evaluate": "evaluation",
    "evaluate.guard": "guard",
}
RECOVERED = (
    "spent by the node but never recorded here (its reply lost when the server stopped "
    "mid-round, or an earlier federation on the same data); parameters from its next contribution"
)


def record_lost_contributions(
    ledger: PrivacyLedger, server_round: int, node: str, release: dict
) -> list[dict]:
    """Append the contributions ``node`` made before ``release`` (its report) that the ledger
    lacks (at most two per round run so far: a forged index must not fill the ledger);
    returns them. None when their epsilon cannot be computed or is not finite, or when none of
    the node's releases is a DP-SGD round (a lost one could be: nothing here bounds it): the
    audit then reports the gap. Each takes the parameters of the node's costliest known
    release (the largest epsilon alone, among its training and encoder releases), and no
    signature: it is the server's record, which the node's receipt log can confirm."""
    mine = [e for e in ledger.entries if e["kind"] == "contribution" and e["node"] == node]
    expected = mine[-1]["contribution_index"] + 1 if mine else 0
    missing = int(release["contribution_index"]) - expected
    if missing <= 0:
        return []
    # a training and an evaluation release per model round, and encoder rounds numbered from 1
    if missing > 3 * server_round:
        log.warning(
            "node %s: contribution_index jumps by %d in round %d, more than this run's rounds "
            "could lose; not recovered (the audit reports the gap)",
            node,
            missing,
            server_round,
        )
        return []
    if not any(e.get("purpose", "training") in DP_SGD for e in [*mine, release]):
        log.warning(
            "node %s: %d contribution(s) lost before round %d, and none of its releases here is "
            "a DP-SGD round that could bound one: not recovered (the node is counted unbounded, "
            "the audit reports the gap)",
            node,
            missing,
            server_round,
        )
        return []
    entries: list[dict] = []
    try:  # best effort: the release itself is recorded next whatever happens here
        entries = _lost(mine, release, server_round, node, expected)
    except (ArithmeticError, MemoryError, ValueError):
        entries = []
    # none computed, or one not finite (no noise): the ledger holds finite numbers only
    if not entries or not all(math.isfinite(e["epsilon"]) for e in entries):
        log.warning(
            "node %s: its %d lost contribution(s) have no finite epsilon to record; not "
            "recovered (the audit reports the gap)",
            node,
            missing,
        )
        return []
    recovered = []
    for entry in entries:
        index = entry["contribution_index"]
        log.warning("node %s: contribution %d was never recorded; recording it", node, index)
        recovered.append(ledger.append("contribution", recovered=RECOVERED, **entry))
    return recovered


def costliest(releases: list[dict]) -> dict:
    """The release a lost one of the same node is accounted at: the largest epsilon alone,
    among its training and encoder releases (their parameters are fixed for a node within a
    run)."""
    return _dearest([e for e in releases if e.get("purpose", "training") in DP_SGD])


def _lost(mine: list[dict], release: dict, server_round: int, node: str, expected: int) -> list:
    """The entries of the contributions between ``mine`` (the node's recorded ones) and
    ``release``, with the parameters of the costliest and their cumulative epsilon."""
    template = {k: v for k, v in costliest([*mine, release]).items() if k in release}
    # the server's record, unsigned: no signature, nor the start another release was asked by
    unsigned = ("signature", "key_id", SERVER_START)
    template = {k: v for k, v in template.items() if k not in unsigned}
    entries: list[dict] = []
    for index in range(expected, int(release["contribution_index"])):
        entry = {**template, "round": server_round, "node": node, "contribution_index": index}
        entry["epsilon"] = epsilon_curve([*mine, *entries, entry])[-1]
        entries.append(entry)
    return entries


def record_unanswered(
    ledger: PrivacyLedger, server_round: int, unanswered: dict[str, str], stage: str = "train"
) -> None:
    """Append an ``unanswered`` entry for each node of ``unanswered`` (node name -> why: no
    reply, or the error Flower returned) that a private request of ``stage`` reached in
    ``server_round`` without a reply to record."""
    named = {} if stage == "train" else {"stage": stage}
    for node, reason in sorted(unanswered.items()):
        log.warning("round %d, node %s: no answer to %s (%s)", server_round, node, stage, reason)
        ledger.append("unanswered", round=server_round, node=node, reason=reason, **named)


def record_requested(
    ledger: PrivacyLedger,
    server_round: int,
    nodes: list[str],
    unnamed: list[int],
    stage: str = "train",
) -> None:
    """Before a private request of ``stage`` leaves: a ``requested`` entry naming the nodes it
    goes to (``nodes``, as the ledger names them; ``unnamed``: the Flower ids of nodes not yet
    heard from), counted as spent until :func:`record_answered` closes it."""
    named = {} if stage == "train" else {"stage": stage}
    ledger.append(
        "requested", round=server_round, nodes=sorted(nodes), unnamed=sorted(unnamed), **named
    )


def record_answered(ledger: PrivacyLedger, server_round: int, stage: str = "train") -> None:
    """Close the last ``requested`` entry: every reply of the exchange, and every request left
    unanswered, is recorded above."""
    named = {} if stage == "train" else {"stage": stage}
    ledger.append("answered", round=server_round, **named)


def none_trained(entries: list[dict], server_round: int) -> str:
    """Why no node trained in ``server_round``, said plainly when its nodes declined it for
    their budget: the round, the epsilon they had spent (rounded up) and the first node's
    reason; and, when the ledger holds releases recovered from replies an interrupted start
    never received (:data:`RECOVERED`), that those rounds were spent twice, which is where the
    budget went."""
    declined = [
        e
        for e in entries
        if e.get("kind") == "declined" and e.get("round") == server_round and "stage" not in e
    ]
    if not declined:
        return "no node could train (refused by policy, budgets spent or no valid update)"
    spent = max((e["epsilon"] for e in declined if e.get("epsilon") is not None), default=None)
    said = f", having spent epsilon {up(spent, 3)} per customer" if spent is not None else ""
    why = (
        f"round {server_round} was declined by {len(declined)} node(s) for their budget{said} "
        f"({declined[0].get('node')}: {declined[0].get('reason')})"
    )
    lost = [e for e in entries if e.get("kind") == "contribution" and e.get("recovered")]
    if lost:
        rounds = ", ".join(str(r) for r in sorted({e.get("round") for e in lost}, key=str))
        why += (
            f"; {len(lost)} release(s) were spent in a round the run was interrupted in, "
            f"before their replies reached the ledger (recovered in round {rounds}): the "
            "rounds asked again spent the budget a second time, and none was left for this one"
        )
    return why


def outstanding_requests(entries: list[dict]) -> dict[str, list[dict]]:
    """Per node, the requests still counted as spent: its ``unanswered`` entries and the
    requests in flight at a stop (:func:`in_flight`). One is settled by a recovered
    contribution of the node (it records a lost release: the oldest pending one). An
    unanswered one is also settled by any contribution of the node from a later round (the
    model's rounds follow the encoder's, numbered from 1 again): its index shows whether the
    lost request was charged, since a node charges a run's requests in the order of their
    rounds (client/accountant.py refuses a late one). A contribution of the same round settles
    none: a node handling two requests at once may charge them in either order. One in flight
    is settled by the node's next contribution whose index follows its previous one, whatever
    its round, signed for a later server start (:func:`_restarted`): the server that asked is
    gone, the node charged nothing the ledger lacks, and it refuses that server's requests
    from then on."""
    stopped = in_flight(entries)
    size = federation_size(entries)
    pending: dict[str, list[dict]] = {}
    last: dict[str, object] = {}  # node -> the index of its last contribution
    for entry in entries:
        node = str(entry.get("node"))
        if entry.get("kind") == "unanswered":
            pending.setdefault(node, []).append(entry)
        elif id(entry) in stopped:
            for request in stopped[id(entry)]:
                pending.setdefault(str(request["node"]), []).append(request)
        elif entry.get("kind") == "contribution":
            index = entry.get("contribution_index")
            follows = _follows(last.get(node), index) and not entry.get("recovered")
            last[node] = index
            if follows:
                _seen_by_unnamed(pending, node, entry, size)
            if node not in pending:
                continue
            named = [e for e in pending[node] if not e.get("unnamed")]  # by count alone
            if entry.get("recovered") and named:
                pending[node].remove(named[0])
            elif not entry.get("recovered"):
                settled = [e for e in named if _settles(entry, e, follows)]
                pending[node] = [e for e in pending[node] if not any(e is x for x in settled)]
            if not pending[node]:
                del pending[node]
    return {
        node: [{k: v for k, v in r.items() if k not in ("seen", "start")} for r in requests]
        for node, requests in pending.items()
    }


def in_flight(entries: list[dict]) -> dict[int, list[dict]]:
    """For each ``requested`` entry no ``answered`` entry of its round and stage closed before
    the next request (the server stopped or crashed meanwhile; by ``id``), one request per node
    it names, marked ``in_flight``, with the server ``start`` that asked (a node not yet heard
    from: ``flower node <id>``, marked ``unnamed`` too, with the set ``seen`` of the nodes that
    released after it, each whose index followed its previous one)."""
    starts = server_starts(entries)
    stopped: list[dict] = []
    current = None
    for entry in entries:
        if entry.get("kind") == "requested":
            stopped += [current] if current is not None else []
            current = entry
        elif (
            entry.get("kind") == "answered" and current is not None and _same_stage(current, entry)
        ):
            current = None
    stopped += [current] if current is not None else []
    requests: dict[int, list[dict]] = {}
    for request in stopped:
        asked = {k: request[k] for k in ("round", "stage") if k in request}
        asked["start"] = starts[id(request)]
        seen: set[str] = set()  # shared by the request's unnamed nodes
        requests[id(request)] = [
            {**asked, "kind": "requested", "node": str(n), "in_flight": True}
            for n in request["nodes"]
        ] + [
            {
                **asked,
                "kind": "requested",
                "node": f"flower node {n}",
                "in_flight": True,
                "unnamed": True,
                "seen": seen,
            }
            for n in request["unnamed"]
        ]
    return requests


def _same_stage(request: dict, answered: dict) -> bool:
    """Whether ``answered`` closes ``request``: the same round and stage."""
    return (request.get("round"), request.get("stage", "train")) == (
        answered.get("round"),
        answered.get("stage", "train"),
    )


def _follows(previous: object, index: object) -> bool:
    """Whether contribution ``index`` follows ``previous`` (the node's last here; None: it has
    none, and its first is 0) with no gap."""
    if not isinstance(index, int) or isinstance(index, bool):
        return False
    return index == (previous + 1 if isinstance(previous, int) else 0)


def server_starts(entries: list[dict]) -> dict[int, int]:
    """For each entry (by ``id``), the server start it was written under: 1 up to the first
    ``resumed`` entry (a ledger from before starts were numbered has none), one more from each."""
    start, starts = 1, {}
    for entry in entries:
        start += entry.get("kind") == "resumed"
        starts[id(entry)] = start
    return starts


def current_start(entries: list[dict]) -> int:
    """The server start the ledger's last entry was written under (:func:`server_starts`)."""
    return 1 + sum(e.get("kind") == "resumed" for e in entries)


def _restarted(contribution: dict, request: dict) -> bool:
    """Whether the node signed ``contribution`` for a later server start than the one that
    asked ``request`` (in flight): the node charges a run's requests in the order of their
    starts, so it refuses that request from then on. A release that states no start (a node of
    before starts were numbered) is taken as later, the rule before; one whose start is not a
    whole number (a tampered ledger) as not."""
    if SERVER_START not in contribution:
        return True
    start = contribution[SERVER_START]
    return isinstance(start, int) and not isinstance(start, bool) and start > request["start"]


def _seen_by_unnamed(
    pending: dict[str, list[dict]], node: str, contribution: dict, size: int | None
) -> None:
    """``node`` released ``contribution`` after each pending unnamed request, its index
    following its previous one, for a later server start (:func:`_restarted`); those released
    after so by as many nodes as the run has are settled: none of its nodes charged a release
    the ledger lacks, nor will."""
    for name in list(pending):
        for request in [r for r in pending[name] if r.get("unnamed")]:
            if not _restarted(contribution, request):
                continue
            request["seen"].add(node)
            if size is not None and len(request["seen"]) >= size:
                pending[name].remove(request)
        if not pending[name]:
            del pending[name]


def federation_size(entries: list[dict]) -> int | None:
    """The number of nodes the run's first start declares (None: none that is a count)."""
    start = next((e for e in entries if e.get("kind") == "run_start"), {})
    size = (
        start.get("config", {}).get("num_nodes") if isinstance(start.get("config"), dict) else None
    )
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _settles(contribution: dict, request: dict, follows: bool) -> bool:
    """Whether ``contribution`` (``follows``: its index follows the node's previous one)
    settles the pending ``request``: one in flight when it follows and was asked by a later
    server start (:func:`_restarted`), an unanswered one when it comes from a later round (a
    round that is not a number, in a tampered ledger, settles nothing)."""
    if request.get("in_flight"):
        return follows and _restarted(contribution, request)
    model_round = contribution.get("purpose") != "encoder"
    if str(request.get("stage", "train")) == "train.encoder" and model_round:
        return True
    rounds = (contribution.get("round"), request.get("round"))
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds):
        return False
    return model_round == (request.get("stage") != "train.encoder") and rounds[0] > rounds[1]


def request_purpose(request: dict) -> str:
    """The purpose of the release an ``unanswered`` entry's request asked for."""
    return STAGE_PURPOSE.get(str(request.get("stage", "train")), "training")


def outstanding_releases(
    entries: list[dict], answer_sigma: Callable[[str, float], float | None]
) -> tuple[list[dict], list[str]]:
    """(for each outstanding request of a node, the release it is counted at, marked
    ``outstanding``; the nodes whose outstanding spending no release of theirs bounds). The
    release counted: the node's costliest of the request's purpose; for an answer of a
    purpose it never released (the start guard's comparison is asked once, last), the one
    Gaussian answer its plan gives it (``answer_sigma(purpose, its declared customers)``).
    A node that never contributed, that left a DP-SGD request (training, encoder) unanswered
    without ever releasing one of that purpose, or whose indices skip one never recovered, is
    unbounded: what it spent there is not in this ledger."""
    contributions: dict[str, list[dict]] = {}
    for entry in entries:
        if entry.get("kind") == "contribution":
            contributions.setdefault(str(entry["node"]), []).append(entry)
    copies: list[dict] = []
    unbounded = [node for node, mine in contributions.items() if _has_gap(mine)]
    for node, requests in outstanding_requests(entries).items():
        mine = contributions.get(node, [])
        for purpose in map(request_purpose, requests):
            alike = [c for c in mine if c.get("purpose", "training") == purpose]
            sigma = None
            if mine and not alike:
                sigma = answer_sigma(purpose, float(mine[-1]["num_customers"]))
            if alike:
                copies.append({**_dearest(alike), "outstanding": True})
            elif sigma is not None:
                copies.append({**mine[-1], **planned_answer(purpose, sigma), "outstanding": True})
            else:
                unbounded.append(node)
    return copies, sorted(set(unbounded))


def _has_gap(contributions: list[dict]) -> bool:
    """Whether a node's contribution indices skip one that was never recovered."""
    indices = {c["contribution_index"] for c in contributions}
    return max(indices) + 1 > len(indices)


def planned_answer(purpose: str, sigma: float) -> dict:
    """The release fields of one planned private answer of ``purpose`` at noise ``sigma``
    (the Gaussian mechanism at sensitivity 1, once)."""
    return {
        "purpose": purpose,
        "mechanism": "gaussian",
        "noise_multiplier": sigma,
        "sample_rate": 1.0,
        "steps": 1,
    }


def _dearest(releases: list[dict]) -> dict:
    """The release with the largest epsilon alone."""
    return max(releases, key=lambda e: recompute_epsilon([e], float(e["delta"])))
