"""The audit's checks of who wrote the contributions: each node's signature over its entries
(``OUT/node-keys/<node>.pem`` or ``--node-keys DIR``) and the nodes' own receipt logs
(``--receipts NODE=PATH``). See shared/federation/signing.py for the scheme."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import NamedTuple

from server.privacy.accounting import recompute_epsilon
from server.privacy.audit_checks import by_node, check, entry_problem, is_number
from server.privacy.audit_federation import counted_release
from server.privacy.ledger import json_object
from server.privacy.ledger_gaps import federation_size, request_purpose
from shared.federation.signing import (
    OPTIONAL_FIELDS,
    SERVER_START,
    SIGNED_FIELDS,
    public_key_id,
    signed_payload,
    verify,
)


def ledger_run_id(entries: list[dict]) -> str | None:
    """The run id contributions must carry: the hash of the ledger's first run_start entry."""
    return next((e.get("hash") for e in entries if e.get("kind") == "run_start"), None)


def _node_key(keys_dir: Path, node: str) -> tuple[str, str]:
    """(public PEM, key id) of ``node`` from ``keys_dir/<node>.pem``; ValueError saying why not."""
    path = keys_dir / f"{node}.pem"
    if not node or Path(node).name != node or node in (".", ".."):
        raise ValueError(f"node name {node!r} cannot name a key file")
    try:  # a name too long for a file, in a tampered ledger: no key
        pem = path.read_text(encoding="ascii", errors="replace")
    except OSError as error:
        raise ValueError(f"no public key {str(path)[:200]} ({error.strerror})") from None
    return pem, public_key_id(pem)


def _signature_problem(c: dict, pem: str | None, key_id: str | None) -> str | None:
    """Why a contribution's signature does not verify with its node's key (None: it does, or
    there is no key: then only that it carries one)."""
    if not c.get("signature"):
        return "unsigned"
    if pem is None:
        return None
    if c.get("key_id") != key_id:
        return f"key_id {c.get('key_id')!r} is not {key_id} ({c['node']}.pem)"
    try:
        payload = signed_payload(c)
    except KeyError as error:
        return str(error.args[0])
    if not verify(pem, payload, c["signature"]):
        return (
            "the signature does not verify: the entry was altered after the node signed it, "
            "or forged"
        )
    return None


def _costliest(releases: list[dict]) -> dict | None:
    """The release of the largest epsilon alone among the training and encoder ones: what the
    server copies into a recovered contribution (ledger_gaps); None without one."""
    dp_sgd = [c for c in releases if c.get("purpose", "training") in ("training", "encoder")]
    if not dp_sgd:
        return None
    return max(dp_sgd, key=lambda c: recompute_epsilon([c], float(c["delta"])))


def _recovered_problem(
    c: dict, cs: list[dict], status: dict[int, str | None], lines: dict[int, int]
) -> str | None:
    """Why a recovered (unsigned) contribution is not accepted (None: it is). The server
    records one only when the node's next release shows the index gap, right before it, with
    the parameters of the node's costliest release so far: that next contribution must be
    signed and verify, lie in the same or a later round, and the recovered entry carry the
    mechanism, noise multiplier, sample rate and steps of the costliest signed release up to
    it."""
    position = {id(x): i for i, x in enumerate(cs)}
    later = cs[position[id(c)] + 1 :]
    following = next((x for x in later if not x.get("recovered")), None)
    if following is None:
        return "the node has no signed contribution after it to vouch for it"
    where = f"its next contribution (line {lines[id(following)]})"
    if status.get(id(following)) is not None:
        return f"{where} is not a valid signed release ({status[id(following)]})"
    if not (isinstance(following["round"], int) and isinstance(c["round"], int)):
        return f"{where} or it has no integer round"
    if following["round"] < c["round"]:
        return f"{where} is in round {following['round']}, before it"
    signed = [x for x in cs[: position[id(following)] + 1] if not x.get("recovered")]
    if any(entry_problem(x) for x in [c, *signed]):
        return None  # the recomputed check reports the entry
    costliest = _costliest(signed)
    if costliest is None:
        return "the node has no signed DP-SGD release up to it, so none bounds a lost one"
    differ = [
        f"{k} {c.get(k)!r} (expected {costliest.get(k)!r})"
        for k in ("mechanism", "noise_multiplier", "sample_rate", "steps")
        if c.get(k) != costliest.get(k)
    ]
    if differ:
        return (
            f"it is not at the node's costliest signed release (line "
            f"{lines[id(costliest)]}): {', '.join(differ)}"
        )
    return None


def _start_problem(c: dict, start: int | None) -> str | None:
    """Why the server start ``c`` is signed for is not ``start``, the one it sits under in the
    ledger (None: it is, or ``c`` states none, as a node of before starts were numbered)."""
    if SERVER_START not in c:
        return None
    signed = c[SERVER_START]
    if isinstance(signed, int) and not isinstance(signed, bool) and signed == start:
        return None
    return (
        f"signed for server start {reprlib.repr(signed)}, but it sits under the ledger's start "
        f"{start} (the run_start, and one more at each 'resumed' entry before it)"
    )


class Signatures(NamedTuple):
    """What the node keys say of the contributions: ``have_keys`` (any to verify with),
    ``key_errors`` (node -> why its key cannot be read), ``status`` (id of each contribution
    but a server-recovered one -> why its signature does not verify; None: it does, or there
    is no key to tell) and ``verified`` (the ids verified against their node's key)."""

    have_keys: bool
    key_errors: dict[str, str]
    status: dict[int, str | None]
    verified: set[int]


def read_signatures(contributions: list[dict], keys_dir: Path) -> Signatures:
    """Every contribution's signature checked against its node's key in ``keys_dir``."""
    have_keys = keys_dir.is_dir() and any(keys_dir.glob("*.pem"))
    key_errors: dict[str, str] = {}
    status: dict[int, str | None] = {}
    verified: set[int] = set()
    for node, cs in by_node(contributions).items():
        pem = key_id = None
        if have_keys:
            try:
                pem, key_id = _node_key(keys_dir, node)
            except ValueError as error:
                key_errors[node] = str(error)
        for c in cs:
            if c.get("recovered"):
                continue
            status[id(c)] = _signature_problem(c, pem, key_id)
            if status[id(c)] is None and pem is not None:
                verified.add(id(c))
    return Signatures(have_keys, key_errors, status, verified)


def audit_signatures(
    report: dict,
    contributions: list[dict],
    run_id: str | None,
    lines: dict[int, int],
    keys_dir: Path,
    signatures: Signatures,
    starts: dict[int, int],
) -> None:
    """A contribution's run id, where it has one, is this ledger's, and the server start it is
    signed for, where it states one, the one it sits under (``starts``: ledger_gaps's
    ``server_starts``; the ledger's rule for a request a stopped server left in flight relies
    on it); with node keys, every
    contribution but a server-recovered one carries its node's valid signature over
    :func:`signed_payload` and that key's id (``signatures``: :func:`read_signatures` of
    ``keys_dir``). Without keys, an unsigned (older) ledger gets a note, not a failure."""
    have_keys, status = signatures.have_keys, signatures.status
    if not have_keys and not any("run_id" in c for c in contributions):
        if contributions:
            report["notes"].append(
                f"signatures not checked: the contributions are unsigned (a ledger from before "
                f"signed contributions) and there are no node keys in {keys_dir}"
            )
        return
    problems, recovered = [], []
    for node, cs in by_node(contributions).items():
        if node in signatures.key_errors:
            problems.append(
                f"node {node}: {signatures.key_errors[node]}: its {len(cs)} contribution(s) "
                "unverified"
            )
        keyed = have_keys and node not in signatures.key_errors
        for c in cs:
            where = f"node {node}, line {lines[id(c)]} (round {c['round']})"
            if "run_id" in c and c["run_id"] != run_id:
                problems.append(
                    f"{where}: run_id {c['run_id']!r} is not this ledger's {run_id!r}: an "
                    "entry of another run"
                )
            if problem := _start_problem(c, starts.get(id(c))):
                problems.append(f"{where}: {problem}")
            if c.get("recovered"):
                recovered.append(c)
            elif keyed and status[id(c)] is not None:
                problems.append(f"{where}: {status[id(c)]}")
        problems += [
            f"node {node}, line {lines[id(c)]} (round {c['round']}): recovered by the server, "
            f"but {why}"
            for c in cs
            if c.get("recovered") and (why := _recovered_problem(c, cs, status, lines))
        ]
    if recovered:
        report["notes"].append(
            f"line(s) {', '.join(str(lines[id(c)]) for c in recovered)}: recovered by the "
            "server (the node's reply was lost), not signed by the node: accepted only where the "
            "node's next contribution is signed, verifies and carries its parameters; "
            "--receipts compares them with what the node recorded"
        )
    if not have_keys:
        report["notes"].append(
            f"signatures not verified: no node keys in {keys_dir} (fedrec audit OUT "
            "--node-keys DIR, with the keys obtained from the nodes)"
        )
    report["checks"].append(
        check(
            "signatures",
            "contributions signed by their node, for this run"
            if have_keys
            else "contributions carry this run's id (no node keys: signatures not verified)",
            problems,
            f"{len(signatures.verified)} signature(s) verified against {keys_dir}"
            if have_keys
            else "every contribution carries this ledger's run id (signatures not verified)",
        )
    )


def read_receipts(path: Path) -> list[dict]:
    """A node's receipt log (JSON lines); ValueError naming a bad line."""
    receipts = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            receipts.append(json_object(line))
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
    return receipts


def audit_receipts(
    report: dict,
    contributions: list[dict],
    run_id: str | None,
    lines: dict[int, int],
    receipts: dict[str, Path],
    outstanding: dict[str, list[dict]] | None = None,
) -> None:
    """Each named node's receipts of this run appear in the ledger with identical signed
    fields, and each of its ledger contributions among its receipts. A receipt the ledger
    lacks passes only as the release of one of the node's ``outstanding`` requests (its
    unanswered entries no later release settled; same round and purpose), no costlier than the
    release the audit counted for it (server/privacy/ledger_gaps.py)."""
    problems, compared = [], 0
    missing = object()
    lost = {node: list(requests) for node, requests in (outstanding or {}).items()}
    for node, path in receipts.items():
        try:
            logged = read_receipts(path)
        except (OSError, ValueError) as error:
            problems.append(f"node {node}: {path}: {error}")
            continue
        mine = [r for r in logged if r.get("run_id") == run_id]
        others = {str(r.get("run_id"))[:12] for r in logged if r.get("run_id") != run_id}
        if others:  # the node's spending elsewhere: what this ledger cannot show
            report["notes"].append(
                f"node {node}: its receipt log also holds {len(logged) - len(mine)} release(s) "
                f"of {len(others)} other run id(s) ({', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}): audit those runs' ledgers for them"
            )
        ledger = {  # an index that is not an integer fails the contribution_index check
            c["contribution_index"]: c
            for c in contributions
            if str(c["node"]) == node and isinstance(c["contribution_index"], int)
        }
        seen = set()
        for r in mine:
            index = r.get("contribution_index")
            c = ledger.get(index) if isinstance(index, int) else None
            seen.add(index if isinstance(index, int) else None)
            if c is None:
                why = _unrecorded_problem(node, r, ledger, lost, report["config"])
                if why:
                    problems.append(
                        f"node {node}, round {r.get('round')}: its receipt (contribution_index "
                        f"{index!r}) is not in the ledger{why}"
                    )
                else:
                    report["notes"].append(
                        f"node {node}, round {r.get('round')}: its receipt (contribution_index "
                        f"{index}) is the release of a request recorded as unanswered, no "
                        "costlier than the release the audit counted for it"
                    )
                continue
            compared += 1
            for field in SIGNED_FIELDS + OPTIONAL_FIELDS:
                if r.get(field, missing) != c.get(field, missing):
                    problems.append(
                        f"node {node}, round {c['round']} (line {lines[id(c)]}): {field}: "
                        f"the receipt has {r.get(field)!r}, the ledger {c.get(field)!r}"
                    )
        problems.extend(
            f"node {node}, round {c['round']} (line {lines[id(c)]}): not among the node's "
            f"receipts ({path})"
            for index, c in ledger.items()
            if index not in seen
        )
    report["checks"].append(
        check(
            "receipts",
            "the ledger matches the nodes' receipts",
            problems,
            f"{compared} receipt(s) of {len(receipts)} node(s) match the ledger, both ways",
        )
    )


def _unrecorded_problem(
    node: str, receipt: dict, ledger: dict[int, dict], lost: dict[str, list[dict]], config: dict
) -> str:
    """Why a receipt the ledger lacks is not the release of one of ``node``'s outstanding
    requests (``lost``, one used up per receipt) as counted: "" when it is."""
    index, purpose = receipt.get("contribution_index"), receipt.get("purpose", "training")
    recorded = [i for i in ledger if isinstance(i, int)]  # a tampered index fails elsewhere
    if not isinstance(index, int) or index <= max(recorded, default=-1):
        return " (nor after the node's last contribution there)"
    match = next(
        (
            e
            for e in lost.get(node, [])
            if e["round"] == receipt.get("round") and request_purpose(e) == purpose
        ),
        None,
    )
    if match is None:
        return " (nor an unanswered request of its round and purpose)"
    counted = counted_release(list(ledger.values()), purpose, config)
    if counted is None:
        return " (no release of the node here bounds its unanswered request)"
    # no costlier, compared by parameters (a receipt's own figures are not recomputed: it
    # could ask for anything): the same mechanism, no less noise, no more sampling or steps
    dominated = (
        receipt.get("mechanism") == counted["mechanism"]
        and all(is_number(receipt.get(k)) for k in ("noise_multiplier", "sample_rate", "steps"))
        and receipt["noise_multiplier"] >= counted["noise_multiplier"]
        and receipt["sample_rate"] <= counted["sample_rate"]
        and receipt["steps"] <= counted["steps"]
    )
    if not dominated:
        return " (its release may cost more than the audit counted for the unanswered request)"
    lost[node].remove(match)
    return ""


def audit_absent_nodes(report: dict, entries: list[dict], keys_dir: Path) -> None:
    """The ``absent_nodes`` check, a warning and never a failure: nodes the ledger never
    names, though the run's start declares them (``num_nodes``, which every node's signature
    binds through the first entry's hash) or an auditor holds their key (``keys_dir``, keys
    obtained from the merchants, ``--node-keys``). Whoever writes the ledger can remove every
    entry of one node and chain the rest again: the first entry keeps its hash, so the other
    nodes' signatures still verify, and the composition over all nodes leaves that node's
    spending out. Only its receipts (``--receipts``) show what it spent; a node that never
    took part (never sampled under ``fraction-train``, never connected) is absent too, hence a
    warning."""
    keys = sorted(path.stem for path in keys_dir.glob("*.pem")) if keys_dir.is_dir() else []
    named = {str(e["node"]) for e in entries if "node" in e}
    named |= {str(n) for e in entries if e.get("kind") == "requested" for n in e.get("nodes", [])}
    problems = [
        f"node {node}: its key is in {keys_dir}, but no ledger entry names it: it never "
        "took part, or its entries were removed (its spending is then in no statement "
        f"here): check its receipts (--receipts {node}=PATH)"
        for node in keys
        if node not in named
    ]
    declared = federation_size(entries)
    if declared is not None and len(named) < declared:
        problems.append(
            f"the run's start declares {declared} node(s), the ledger names {len(named)}: the "
            f"other {declared - len(named)} never took part (never sampled, never connected), "
            "or their entries were removed, their spending then in no statement here; ask "
            "each merchant of the federation for its receipts (--receipts NODE=PATH)"
        )
    report["checks"].append(
        check(
            "absent_nodes",
            "every node the run declares or an auditor holds a key of is in the ledger",
            problems,
            f"the ledger names all {max(declared or 0, len(named))} node(s) the run declares"
            + (f" and all {len(keys)} with a key" if keys else ""),
            "warn" if problems else None,
        )
    )
