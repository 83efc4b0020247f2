"""``fedrec audit OUT``: the privacy audit of a run, see docs/privacy-audit.md.

Reads ``OUT/ledger.jsonl`` (and ``OUT/metrics.json``, ``OUT/canaries.json``, the node keys in
``OUT/node-keys/`` when present), recomputes every epsilon with dp-accounting's PLD accountant,
independently of the nodes' Opacus PRV accountant, and checks: the hash chain and the entries'
fields, contribution_index gaps, reported >= recomputed x (1 - tolerance) after every
contribution, each node's budget, delta, each node's noise calibration, the nodes' signatures
and receipts, the node-level epsilons, the empirical lower bound and the guarantee metrics.json
states. Writes ``OUT/audit.json`` and a self-contained ``OUT/audit.html``; exit 0 only when no
check fails, 1 when one does, 2 when there is no ledger to audit.

This module reads the ledger and runs the check families in order: ``server.privacy.audit_checks``
(accounting, rounds against run_end), ``server.privacy.audit_federation`` (the audit's own
federation statement, the budgets, metrics.json), ``server.privacy.audit_calibration`` (the
nodes' noise against their plan), ``server.privacy.audit_node_level`` (node-level DP),
``server.privacy.audit_signatures`` (who wrote the entries),
``server.privacy.audit_report`` (the terminal summary and the HTML page).
"""

from __future__ import annotations

import argparse
import json
import reprlib
import sys
from pathlib import Path
from typing import Any

from server.privacy.audit_calibration import audit_calibration
from server.privacy.audit_card import audit_model_card
from server.privacy.audit_checks import (
    audit_canaries,
    audit_contributions,
    audit_delta,
    audit_releases,
    audit_rounds,
    check,
    is_round,
)
from server.privacy.audit_federation import audit_federation, audit_metrics
from server.privacy.audit_node_level import audit_node_level
from server.privacy.audit_report import jsonable, print_summary, write_html
from server.privacy.audit_signatures import (
    audit_absent_nodes,
    audit_receipts,
    audit_signatures,
    ledger_run_id,
    read_signatures,
)
from server.privacy.ledger import (
    REQUIRED,
    LedgerError,
    missing_fields,
    read_ledger,
    verify_chain,
)
from server.privacy.ledger_gaps import STAGE_PURPOSE, outstanding_requests, server_starts

DEFAULT_TOLERANCE = 0.01


class AuditInputError(Exception):
    """Nothing to audit: no ledger, or an empty one."""


def _receipt_argument(text: str) -> tuple[str, Path]:
    node, sep, path = text.partition("=")
    if not sep or not node or not path:
        raise argparse.ArgumentTypeError(f"expected NODE=PATH, got {text!r}")
    return node, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the run's output directory (holds ledger.jsonl)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative numerical tolerance: a reported epsilon may fall below the PLD "
        "recomputation, and a node's plan may pass its target epsilon, by this fraction "
        f"before it is flagged (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--node-keys",
        type=Path,
        metavar="DIR",
        help="the nodes' public keys, DIR/<node>.pem, to verify their signatures with "
        "(default OUT/node-keys; better: keys obtained from the merchants themselves)",
    )
    parser.add_argument(
        "--receipts",
        type=_receipt_argument,
        action="append",
        default=[],
        metavar="NODE=PATH",
        help="a node's receipt log (its <data dir>/privacy/receipts.jsonl) to cross-check "
        "with the ledger; repeatable",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the audit as JSON instead of the table"
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.tolerance < 1:
        print(f"fedrec audit: --tolerance must be in [0, 1), got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        report = audit(args.out, args.tolerance, args.node_keys, dict(args.receipts))
    except AuditInputError as error:
        print(f"fedrec audit: {error}", file=sys.stderr)
        return 2
    written = (args.out / "audit.json", args.out / "audit.html")
    written[0].write_text(json.dumps(jsonable(report), indent=2) + "\n")
    write_html(report, written[1])
    if args.json:
        print(json.dumps(jsonable(report), indent=2))
    else:
        print_summary(report)
    print(f"wrote {written[0]} and {written[1]}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report["passed"] else 1


def audit(
    out: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    node_keys: Path | None = None,
    receipts: dict[str, Path] | None = None,
) -> dict:
    """Audit the run in ``out``; returns the report (``report["passed"]``: no check fails).

    ``node_keys``: the directory of the nodes' public keys (default ``out/node-keys``);
    ``receipts``: node name -> that node's receipt log, to cross-check with the ledger.
    """
    out = Path(out)
    path = out / "ledger.jsonl"
    if not path.is_file():
        raise AuditInputError(f"{path}: no privacy ledger (is {out} a federated run's output?)")
    report: dict[str, Any] = {
        "out": str(out),
        "ledger": str(path),
        "tolerance": tolerance,
        "checks": [],
        "nodes": [],
        "declined": [],
        "refused": [],
        "unverified": [],
        "notes": [],
        "federation": None,
        "node_level": None,
        "empirical": None,
        "config": {},
        "dp": None,
        "entries": 0,
        "head_hash": None,
        "run_id": None,
    }
    try:
        entries = read_ledger(path)
    except LedgerError as error:
        report["checks"].append(check("chain", "hash chain", [str(error)], ""))
        report["passed"] = False
        return report
    if not entries:
        raise AuditInputError(f"{path}: the ledger is empty")
    report["entries"], report["head_hash"] = len(entries), entries[-1].get("hash")
    checks = report["checks"]
    checks.append(
        check(
            "chain",
            "hash chain",
            verify_chain(entries),
            f"{len(entries)} entries chained; head hash {entries[-1].get('hash')}",
        )
    )
    incomplete = [
        f"line {n}: {e['kind']} entry lacks {', '.join(lacking)}"
        if lacking != ["kind"]  # a known kind
        else f"line {n}: kind {reprlib.repr(e.get('kind'))} is none of {', '.join(REQUIRED)}"
        for n, e in enumerate(entries, start=1)
        if (lacking := missing_fields(e))
    ]
    incomplete += [
        f"line {n}: {e['kind']} entry's {problem}"
        for n, e in enumerate(entries, start=1)
        if not missing_fields(e)
        for problem in [shape_problem(e)]
        if problem
    ]
    if not any(e.get("kind") == "run_start" for e in entries):
        incomplete.append(
            "no run_start entry (removed, or the ledger starts past it): the run's settings are "
            "unknown (whether it was private, its target, delta and plan)"
        )
    checks.append(
        check(
            "fields",
            "entries carry the required fields",
            incomplete,
            "every entry has its kind's fields",
        )
    )
    lines = {id(e): n for n, e in enumerate(entries, start=1)}
    # a run_start or run_end the fields check fails is left out (a node's entries are kept: what
    # they record spent still counts, and the later checks read them with care)
    complete = [
        e
        for e in entries
        if not missing_fields(e) and (e["kind"] in NODE_ENTRIES or not shape_problem(e))
    ]
    config = _read_config(report, complete, lines)
    report["run_id"] = ledger_run_id(entries)

    contributions = [e for e in complete if e["kind"] == "contribution"]
    for kind in ("declined", "refused"):
        report[kind] = [
            {
                "line": lines[id(e)],
                "round": e["round"],
                "node": str(e["node"]),
                "reason": e["reason"],
            }
            for e in complete
            if e["kind"] == kind
        ]
    report["unverified"] = [
        {"line": lines[id(e)], "round": e["round"], "node": str(e["node"]), "reason": e["reason"]}
        | ({"epsilon": e["epsilon"]} if "epsilon" in e else {})
        | _stated_delta(e.get("release"))
        for e in complete
        if e["kind"] == "unverified"
    ]
    if report["unverified"]:
        report["notes"].append(
            f"line(s) {', '.join(str(u['line']) for u in report['unverified'])}: privacy reports "
            "the server refused (malformed, outside the run's plan or not verifying); what they "
            "claim spent is recorded there, not recomputed: it is added to the guarantee where "
            "every node's spending composes, the guarantee is never below it where one node's "
            "applies"
        )
    epsilon_at = None  # the guarantee's epsilon at another delta, once established
    if report["dp"] is False and not contributions:
        report["guarantee"] = (
            "no formal guarantee: differential privacy was off for this run "
            "(run_start config dp is false); only the chain is checked"
        )
    else:
        audit_contributions(report, contributions, config, lines, tolerance)
        audit_releases(report, contributions, lines)
        outstanding = outstanding_requests(complete)
        if outstanding:
            report["notes"].append(
                f"{sum(map(len, outstanding.values()))} private request(s) went unanswered "
                f"and no later release settled them ({', '.join(sorted(outstanding))}): "
                "each is counted as spent (an 'unanswered' entry, or a 'requested' one the "
                "server stopped before closing)"
            )
        keys_dir = node_keys or out / "node-keys"
        signatures = read_signatures(contributions, keys_dir)
        # a node's vouch for its partition counts only where its signature verified
        epsilon_at = audit_federation(
            report,
            contributions,
            config,
            tolerance,
            outstanding,
            lambda c: id(c) in signatures.verified,
        )
        audit_rounds(report, complete, config)
        audit_delta(report, contributions, config, lines)
        audit_calibration(report, contributions, config, lines, tolerance)
        starts = server_starts(complete)
        audit_signatures(
            report, contributions, report["run_id"], lines, keys_dir, signatures, starts
        )
        audit_absent_nodes(report, complete, keys_dir)
        if receipts:
            audit_receipts(report, contributions, report["run_id"], lines, receipts, outstanding)
        if any(e.get("kind") == "contribution" and missing_fields(e) for e in entries):
            report["guarantee"] += " (understated: incomplete contributions were left out)"
    ends = [e for e in complete if e["kind"] == "run_end"]
    audit_node_level(
        report,
        [e for e in complete if e["kind"] == "node_level"],
        config,
        lines,
        tolerance,
        ends[-1]["rounds_completed"] if ends else None,
    )
    if (out / "canaries.json").is_file():
        audit_canaries(report, out / "canaries.json")
    if (out / "metrics.json").is_file():
        audit_metrics(report, out / "metrics.json", tolerance, epsilon_at)
    if (out / "model" / "README.md").is_file():  # without metrics.json beside it, it fails
        audit_model_card(report, out / "model" / "README.md", out / "metrics.json")
    report["passed"] = all(c["status"] != "fail" for c in checks)
    return report


# the entries a node's answer (or its absence) leaves besides its releases
def _stated_delta(release: object) -> dict:
    """``{"delta": ...}`` of a refused report's release as sent, where it states one."""
    return {"delta": release["delta"]} if isinstance(release, dict) and "delta" in release else {}


NODE_ENTRIES = ("refused", "declined", "unverified", "unanswered")


def shape_problem(entry: dict) -> str | None:
    """What is wrong with the values of an entry that has its kind's fields (None: nothing),
    where a later check would otherwise read them: a run_start's config that is not an object,
    a run_end's count that is not a round count (a tampered one must not make a later check
    loop over it), a node's entry below (:func:`node_entry_problem`). A contribution's or
    node_level entry's values fail the checks that recompute them (``entry_problem``)."""
    if entry["kind"] in NODE_ENTRIES:
        return node_entry_problem(entry)
    if entry["kind"] in ("requested", "answered"):
        return request_problem(entry)
    if entry["kind"] == "run_start" and not isinstance(entry["config"], dict):
        return f"config {reprlib.repr(entry['config'])} is not a JSON object"
    if entry["kind"] == "run_end" and not is_round(entry["rounds_completed"]):
        return f"rounds_completed {reprlib.repr(entry['rounds_completed'])} is not a round count"
    return None


def node_entry_problem(entry: dict) -> str | None:
    """What is wrong with a refused, declined, unverified or unanswered entry's round, node
    or stage (None: nothing): a tampered one must fail the ``fields`` check, never crash a
    later one."""
    server_round, stage = entry["round"], entry.get("stage", "train")
    if not is_round(server_round):
        return f"round {reprlib.repr(server_round)} is not a round number"
    if not isinstance(entry["node"], str):
        return f"node {reprlib.repr(entry['node'])} is not a node's name"
    if not (isinstance(stage, str) and (stage == "train" or stage in STAGE_PURPOSE)):
        return f"stage {reprlib.repr(stage)} is none of {', '.join(STAGE_PURPOSE)}"
    return None


def request_problem(entry: dict) -> str | None:
    """What is wrong with a requested or answered entry (None: nothing): its round and stage
    as a node's entry's, a requested one's nodes not a list of names, or its unnamed ones not
    a list of Flower node ids."""
    if problem := node_entry_problem({**entry, "node": ""}):
        return problem
    nodes, unnamed = entry.get("nodes", []), entry.get("unnamed", [])
    if not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
        return f"nodes {reprlib.repr(nodes)} is not a list of node names"
    if not (isinstance(unnamed, list) and all(_node_id(n) for n in unnamed)):
        return f"unnamed {reprlib.repr(unnamed)} is not a list of Flower node ids"
    return None


def _node_id(x: Any) -> bool:
    """Whether ``x`` is a Flower node id (a non-negative integer)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_config(report: dict, complete: list[dict], lines: dict[int, int]) -> dict:
    """The first run_start's config (and unit) into the report; notes on resumes and a missing
    run_end. Without a run_start, ``report["dp"]`` is None: the run is not taken for a
    non-private one (its node entries are private releases)."""
    starts = [e for e in complete if e["kind"] == "run_start"]
    config = starts[0]["config"] if starts else {}
    report["config"], report["dp"] = config, bool(config.get("dp", False)) if starts else None
    if not starts:
        report["notes"].append(
            "no usable run_start: the run is audited as private, every release recomputed and "
            "the guarantee stated at the nodes' own deltas for a customer at every node"
        )
    report["unit"] = starts[0]["unit"] if starts else None
    # the budget each node was asked to keep, where the run states it (server/federation/budget.py)
    report["budget_per_node"] = starts[0].get("budget_per_node") if starts else None
    for later in starts[1:]:
        changed = sorted(
            k
            for k in (
                "dp",
                "delta",
                "target_epsilon",
                "partition",
                "num_nodes",
                "rounds",
                "dp_rounds",
                "dp_batch_size",
                "local_epochs",
                "dp_local_epochs",
                "eval_noise_multiplier",
            )
            if later["config"].get(k) != config.get(k)
        )
        report["notes"].append(
            f"resumed at line {lines[id(later)]}"
            + (f"; config changed: {', '.join(changed)}" if changed else "")
        )
    if not any(e["kind"] == "run_end" for e in complete):
        report["notes"].append(
            "no run_end entry: the run is still going, crashed, or the end of "
            "the ledger was cut off (the chain cannot tell)"
        )
    return config
