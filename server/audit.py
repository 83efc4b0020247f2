"""``fedrec audit OUT``: the privacy audit of a run (CONTRACT §3), see docs/privacy-audit.md.

Reads ``OUT/ledger.jsonl`` (and ``OUT/metrics.json``, ``OUT/canaries.json`` when present),
recomputes every epsilon with dp-accounting's PLD accountant, independently of the nodes' Opacus
PRV accountant, and checks: the hash chain and the entries' fields, contribution_index gaps,
reported >= recomputed x (1 - tolerance) after every contribution, each node's budget, delta,
the node-level epsilons, the empirical lower bound and the guarantee metrics.json states.
Writes ``OUT/audit.json`` and a self-contained ``OUT/audit.html``; exit 0 only when every
check holds, 1 when one fails, 2 when there is no ledger to audit.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from server import accounting
from server.canary_audit import epsilon_lower_bound, read_canaries
from server.ledger import LedgerError, missing_fields, read_ledger, verify_chain

DEFAULT_TOLERANCE = 0.01


class AuditInputError(Exception):
    """Nothing to audit: no ledger, or an empty one."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the run's output directory (holds ledger.jsonl)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative numerical tolerance: a reported epsilon may fall below the PLD "
        f"recomputation by this fraction before it is flagged (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the audit as JSON instead of the table"
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.tolerance < 1:
        print(f"fedrec audit: --tolerance must be in [0, 1), got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        report = audit(args.out, args.tolerance)
    except AuditInputError as error:
        print(f"fedrec audit: {error}", file=sys.stderr)
        return 2
    (args.out / "audit.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    write_html(report, args.out / "audit.html")
    if args.json:
        print(json.dumps(_jsonable(report), indent=2))
    else:
        print_summary(report)
    return 0 if report["passed"] else 1


# ---------------------------------------------------------------------------------------------
# The audit itself: a report dict, no printing.


def _check(name: str, title: str, problems: list[str], ok: str) -> dict:
    return {
        "name": name,
        "title": title,
        "passed": not problems,
        "message": ok if not problems else f"{len(problems)} problem(s)",
        "problems": problems,
    }


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _node_order(node: str) -> tuple:
    return (not node.isdigit(), int(node) if node.isdigit() else 0, node)


def audit(out: Path, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Audit the run in ``out``; returns the report (``report["passed"]``: every check holds)."""
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
        "notes": [],
        "federation": None,
        "node_level": None,
        "empirical": None,
        "config": {},
        "dp": None,
        "entries": 0,
        "head_hash": None,
    }
    try:
        entries = read_ledger(path)
    except LedgerError as error:
        report["checks"].append(_check("chain", "hash chain", [str(error)], ""))
        report["passed"] = False
        return report
    if not entries:
        raise AuditInputError(f"{path}: the ledger is empty")
    report["entries"], report["head_hash"] = len(entries), entries[-1].get("hash")
    checks = report["checks"]
    checks.append(
        _check(
            "chain",
            "hash chain",
            verify_chain(entries),
            f"{len(entries)} entries chained; head hash {entries[-1].get('hash')}",
        )
    )
    incomplete = [
        f"line {n}: {e.get('kind', '?')} entry lacks {', '.join(missing_fields(e))}"
        for n, e in enumerate(entries, start=1)
        if missing_fields(e)
    ]
    checks.append(
        _check(
            "fields",
            "entries carry the required fields",
            incomplete,
            "every entry has its kind's fields",
        )
    )
    lines = {id(e): n for n, e in enumerate(entries, start=1)}
    complete = [e for e in entries if not missing_fields(e)]

    starts = [e for e in complete if e["kind"] == "run_start"]
    config = starts[0]["config"] if starts and isinstance(starts[0]["config"], dict) else {}
    report["config"], report["dp"] = config, bool(config.get("dp", False))
    report["unit"] = starts[0]["unit"] if starts else None
    for later in starts[1:]:
        changed = sorted(
            k
            for k in ("dp", "delta", "target_epsilon", "partition", "num_nodes")
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

    contributions = [e for e in complete if e["kind"] == "contribution"]
    report["declined"] = [
        {"line": lines[id(e)], "round": e["round"], "node": str(e["node"]), "reason": e["reason"]}
        for e in complete
        if e["kind"] == "declined"
    ]
    if not report["dp"] and not contributions:
        report["guarantee"] = (
            "no formal guarantee: differential privacy was off for this run "
            "(run_start config dp is false); only the chain is checked"
        )
    else:
        _audit_contributions(report, contributions, config, lines, tolerance)
        if any(e.get("kind") == "contribution" and missing_fields(e) for e in entries):
            report["guarantee"] += " (understated: incomplete contributions were left out)"
    _audit_node_level(report, [e for e in complete if e["kind"] == "node_level"], lines, tolerance)
    if (out / "canaries.json").is_file():
        _audit_canaries(report, out / "canaries.json", config)
    if (out / "metrics.json").is_file():
        _audit_metrics(report, out / "metrics.json", tolerance)
    report["passed"] = all(c["passed"] for c in checks)
    return report


def _audit_contributions(
    report: dict, contributions: list[dict], config: dict, lines: dict[int, int], tolerance: float
) -> None:
    """Checks (b) indices, (c) recomputed epsilon, (d) budget, (e) delta; the node table and
    the federation guarantee."""
    target = config.get("target_epsilon")
    config_delta = config.get("delta")
    by_node: dict[str, list[dict]] = defaultdict(list)
    for c in contributions:
        by_node[str(c["node"])].append(c)
    gaps, below, over, deltas, notes = [], [], [], [], report["notes"]
    for node in sorted(by_node, key=_node_order):
        cs = by_node[node]
        for prev, c in zip([None, *cs], cs, strict=False):
            if not all(isinstance(x["contribution_index"], int) for x in (prev or c, c)):
                gaps.append(
                    f"node {node}: line {lines[id(c)]}: contribution_index is not an integer"
                )
                continue
            want = 0 if prev is None else prev["contribution_index"] + 1
            if c["contribution_index"] != want:
                gaps.append(
                    f"node {node}: contribution_index {c['contribution_index']} at line "
                    f"{lines[id(c)]}, expected {want}: "
                    + (
                        "a contribution is missing"
                        if c["contribution_index"] > want
                        else "a contribution is repeated or out of order"
                    )
                )
        bad = [f"node {node}, line {lines[id(c)]}: {p}" for c in cs if (p := _entry_problem(c))]
        if bad:
            below.extend(bad)
            report["nodes"].append({"node": node, "contributions": len(cs), "status": "bad entry"})
            continue
        curve = accounting.epsilon_curve(cs)
        points = []
        for c, recomputed in zip(cs, curve, strict=True):
            rel = (c["epsilon"] - recomputed) / recomputed if recomputed > 0 else 0.0
            points.append(
                {
                    "line": lines[id(c)],
                    "round": c["round"],
                    "reported": c["epsilon"],
                    "recomputed": recomputed,
                    "rel_diff": rel,
                }
            )
            if c["epsilon"] < recomputed * (1 - tolerance):
                below.append(
                    f"node {node}, round {c['round']} (line {lines[id(c)]}): reported "
                    f"epsilon {c['epsilon']:.4f} is below the PLD recomputation "
                    f"{recomputed:.4f} ({rel:+.1%}, tolerance {tolerance:.1%})"
                )
            if _is_number(config_delta) and c["delta"] > config_delta:
                deltas.append(
                    f"node {node}, line {lines[id(c)]}: delta {c['delta']:g} exceeds "
                    f"the configured {config_delta:g}"
                )
        last = cs[-1]
        if _is_number(last["num_customers"]) and last["delta"] * last["num_customers"] >= 1:
            notes.append(
                f"node {node}: delta {last['delta']:g} >= 1 / {last['num_customers']} "
                "customers: a weak guarantee (take delta well below 1 / customers)"
            )
        budget = target if _is_number(target) else last["target_epsilon"]
        if last["target_epsilon"] != budget:
            notes.append(
                f"node {node}: contributions state target_epsilon "
                f"{last['target_epsilon']} but the run was configured with {budget}"
            )
        final = max(last["epsilon"], curve[-1])
        declined = [d["round"] for d in report["declined"] if d["node"] == node]
        if not _is_number(budget):
            over.append(f"node {node}: no numeric target_epsilon to check against")
        elif final > budget:
            over.append(f"node {node}: final epsilon {final:.4f} exceeds its budget {budget:g}")
        status = [
            s
            for s, failed in (
                ("index gap", any(g.startswith(f"node {node}:") for g in gaps)),
                ("ε too low", any(b.startswith(f"node {node},") for b in below)),
                ("over budget", any(o.startswith(f"node {node}:") for o in over)),
            )
            if failed
        ]
        report["nodes"].append(
            {
                "node": node,
                "contributions": len(cs),
                "rounds": [c["round"] for c in cs],
                "reported_epsilon": last["epsilon"],
                "pld_epsilon": curve[-1],
                "rdp_epsilon": accounting.rdp_epsilon(cs, last["delta"]),
                "rel_diff": min(p["rel_diff"] for p in points),
                "delta": last["delta"],
                "target_epsilon": budget,
                "declined_rounds": declined,
                "status": ", ".join(status) or "ok",
                "curve": points,
            }
        )
    for d in report["declined"]:
        if d["node"] not in by_node:
            report["nodes"].append(
                {
                    "node": d["node"],
                    "contributions": 0,
                    "rounds": [],
                    "declined_rounds": [d["round"]],
                    "status": "declined only",
                }
            )
    checks = report["checks"]
    checks.append(
        _check(
            "contribution_index",
            "no gaps in contribution_index per node",
            gaps,
            f"{len(contributions)} contributions from {len(by_node)} nodes, indices contiguous",
        )
    )
    checks.append(
        _check(
            "recomputed",
            "reported epsilon >= PLD recomputation x (1 - tolerance)",
            below,
            "every reported epsilon holds against dp-accounting PLD",
        )
    )
    declined_note = (
        f"; {len(report['declined'])} contribution(s) declined to stay in budget"
        if report["declined"]
        else ""
    )
    checks.append(
        _check(
            "budget",
            "every node within its target epsilon",
            over,
            f"every node within budget{declined_note}",
        )
    )
    if not _is_number(config_delta):
        deltas.append("run_start config has no numeric delta to check against")
    checks.append(
        _check(
            "delta",
            "ledger delta <= configured delta",
            deltas,
            f"every contribution's delta <= {config_delta}",
        )
    )
    if any(_entry_problem(c) for c in contributions):
        report["guarantee"] = "not established: some contributions cannot be recomputed"
    elif _is_number(config_delta) and 0 < config_delta < 1:
        report["federation"] = accounting.federation_guarantee(
            contributions, config_delta, str(config.get("partition", ""))
        )
        fed = report["federation"]
        report["guarantee"] = (
            f"({fed['epsilon']:.3f}, {config_delta:g})-DP for "
            f"{fed['unit']} ({fed[fed['applies']]['how']})"
        )
    else:
        report["guarantee"] = "no federation guarantee: the configured delta is unusable"


def _entry_problem(e: dict) -> str | None:
    """Why a contribution or node_level entry cannot be recomputed (None: it can)."""
    try:
        accounting.contribution_event(e)
    except ValueError as error:
        return f"cannot recompute: {error}"
    if not (_is_number(e["delta"]) and 0 < e["delta"] < 1):
        return f"delta must be in (0, 1), got {e['delta']!r}"
    if not _is_number(e["epsilon"]):
        return f"epsilon must be a finite number, got {e['epsilon']!r}"
    return None


def _audit_node_level(
    report: dict, entries: list[dict], lines: dict[int, int], tolerance: float
) -> None:
    """Node-level DP (server-side clipping and noise): reported vs recomputed, and its guarantee."""
    if not entries:
        return
    problems = [f"line {lines[id(e)]}: {p}" for e in entries if (p := _entry_problem(e))]
    if not problems:
        curve = accounting.epsilon_curve(entries)
        for e, recomputed in zip(entries, curve, strict=True):
            if e["epsilon"] < recomputed * (1 - tolerance):
                problems.append(
                    f"round {e['round']} (line {lines[id(e)]}): reported node-level "
                    f"epsilon {e['epsilon']:.4f} is below the PLD recomputation "
                    f"{recomputed:.4f}"
                )
        last = entries[-1]
        report["node_level"] = {
            "epsilon": curve[-1],
            "reported_epsilon": last["epsilon"],
            "delta": last["delta"],
            "rounds": len(entries),
            "unit": last["unit"],
            "rdp_epsilon": accounting.rdp_epsilon(entries, last["delta"]),
            "statement": f"({curve[-1]:.3f}, {last['delta']:g})-DP for {last['unit']}",
        }
    report["checks"].append(
        _check(
            "node_level",
            "node-level epsilon >= PLD recomputation",
            problems,
            f"{len(entries)} node-level rounds hold",
        )
    )


def _audit_canaries(report: dict, path: Path, config: dict) -> None:
    """The one-run empirical lower bound, compared with the formal epsilon it must not exceed."""
    delta = config.get("delta") if _is_number(config.get("delta")) else 0.0
    try:
        data = read_canaries(path)
        bound = epsilon_lower_bound(data["scores"], data["included"], delta=delta)
    except ValueError as error:
        report["checks"].append(_check("empirical", "empirical lower bound", [str(error)], ""))
        return
    bound["score"] = data["score"]
    formal, against = None, None
    fed = report["federation"]
    node = str(data.get("node", ""))
    if fed and node in fed["per_node"]:
        formal, against = fed["per_node"][node], f"node {node}'s epsilon"
    elif fed:
        formal, against = fed["epsilon"], "the federation guarantee"
    bound["formal_epsilon"], bound["compared_with"] = formal, against
    report["empirical"] = bound
    if formal is None:
        report["notes"].append(
            f"empirical lower bound {bound['epsilon_lower_bound']:.3f} "
            "(no formal guarantee to compare with)"
        )
        return
    problems = (
        []
        if bound["epsilon_lower_bound"] <= formal
        else [
            f"the empirical lower bound {bound['epsilon_lower_bound']:.3f} exceeds {against} "
            f"{formal:.3f}: the training leaks more than its accounting claims (or a "
            f"{1 - bound['confidence']:.0%} false alarm)"
        ]
    )
    report["checks"].append(
        _check(
            "empirical",
            "empirical lower bound <= formal epsilon",
            problems,
            f"lower bound {bound['epsilon_lower_bound']:.3f} <= {against} {formal:.3f} "
            f"({bound['confidence']:.0%} confidence, {bound['num_canaries']} canaries)",
        )
    )


def _audit_metrics(report: dict, path: Path, tolerance: float) -> None:
    """metrics.json's privacy statement must not claim less than the audit recomputes."""
    try:
        privacy = json.loads(path.read_text(encoding="utf-8")).get("privacy") or {}
    except (json.JSONDecodeError, AttributeError) as error:
        report["checks"].append(
            _check(
                "metrics", "metrics.json privacy statement", [f"{path}: unreadable ({error})"], ""
            )
        )
        return
    problems = []
    fed = report["federation"]
    claimed = privacy.get("epsilon")
    if fed and _is_number(claimed) and claimed < fed["epsilon"] * (1 - tolerance):
        problems.append(
            f"metrics.json claims epsilon {claimed:.4f}, below the recomputed "
            f"federation guarantee {fed['epsilon']:.4f}"
        )
    ledger_final = {n["node"]: n.get("reported_epsilon") for n in report["nodes"]}
    per_node = privacy.get("per_node")
    for node, value in (per_node if isinstance(per_node, dict) else {}).items():
        value = value.get("epsilon") if isinstance(value, dict) else value
        final = ledger_final.get(str(node))
        if _is_number(value) and _is_number(final) and abs(value - final) > tolerance * final:
            problems.append(
                f"node {node}: metrics.json states epsilon {value:.4f}, the ledger's "
                f"last contribution {final:.4f} (a cut-off ledger?)"
            )
    if fed and (_is_number(claimed) or isinstance(per_node, dict)):
        report["checks"].append(
            _check(
                "metrics",
                "metrics.json agrees with the ledger",
                problems,
                "the privacy statement in metrics.json holds",
            )
        )


def _jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as strings, for strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# Presentation: the terminal summary and the HTML page.


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if _is_number(x) else ("inf" if x == math.inf else "-")


def _rounds(rounds: list[int]) -> str:
    return f"{min(rounds)}-{max(rounds)}" if rounds else "-"


def _node_row(n: dict) -> list[str]:
    return [
        n["node"],
        str(n["contributions"]),
        _rounds(n.get("rounds", [])),
        _fmt(n.get("reported_epsilon")),
        _fmt(n.get("pld_epsilon")),
        _fmt(n.get("rdp_epsilon")),
        _fmt(n.get("rel_diff"), "+.2%"),
        _fmt(n.get("target_epsilon"), "g"),
        n["status"],
    ]


NODE_COLUMNS = [
    "node",
    "n",
    "rounds",
    "reported ε",
    "PLD ε",
    "RDP ε",
    "rel. diff",
    "budget",
    "status",
]


def print_summary(report: dict) -> None:
    """The audit on the terminal: a rich table per node, the checks and the guarantee."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]privacy audit[/bold] of {report['ledger']} ({report['entries']} entries)")
    if report["nodes"]:
        table = Table(
            title="per node (customer level, ε at the ledger's δ)",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for column in NODE_COLUMNS:
            table.add_column(column, no_wrap=True)
        for n in report["nodes"]:
            style = "" if n["status"] == "ok" else "red"
            table.add_row(*_node_row(n), style=style)
        console.print(table)
    for c in report["checks"]:
        mark = "[green]PASS[/green]" if c["passed"] else "[red]FAIL[/red]"
        console.print(f"{mark} {c['title']}: {c['message']}", highlight=False)
        for p in c["problems"][:20]:
            console.print(f"     {p}", highlight=False)
        if len(c["problems"]) > 20:
            console.print(f"     ... {len(c['problems']) - 20} more in audit.json")
    for d in report["declined"]:
        console.print(
            f"declined: node {d['node']}, round {d['round']}: {d['reason']}", highlight=False
        )
    console.print(f"[bold]guarantee:[/bold] {report.get('guarantee', '-')}", highlight=False)
    fed = report["federation"]
    if fed:
        for key in ("one_node", "all_nodes"):
            g = fed[key]
            here = " (this run's partition)" if fed["applies"] == key else ""
            console.print(
                f"  {g['unit']}{here}: ε = {_fmt(g['epsilon'])} at δ = {g['delta']:g}, {g['how']}",
                highlight=False,
            )
    if report["node_level"]:
        console.print(
            f"[bold]node level:[/bold] {report['node_level']['statement']}", highlight=False
        )
    if report["empirical"]:
        e = report["empirical"]
        console.print(
            f"[bold]empirical:[/bold] ε ≥ {e['epsilon_lower_bound']:.3f} with "
            f"{e['confidence']:.0%} confidence ({e['num_canaries']} canaries, "
            f"{e['correct']}/{e['guesses']} guesses right)",
            highlight=False,
        )
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    failed = [c for c in report["checks"] if not c["passed"]]
    if failed:
        console.print(
            "[red bold]audit FAILED[/red bold]: "
            + "; ".join(f"{c['name']} ({c['problems'][0]})" for c in failed),
            highlight=False,
        )
    else:
        console.print("[green bold]audit passed[/green bold]: every check holds")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_epsilon(report: dict) -> str | None:
    """Epsilon over rounds per node (reported: lines, PLD: markers, budget: dashed), base64 PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    nodes = [n for n in report["nodes"] if n.get("curve")]
    if not nodes:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for k, n in enumerate(nodes):
        color = f"C{k % 10}"
        rounds = [p["round"] for p in n["curve"]]
        ax.plot(
            rounds, [p["reported"] for p in n["curve"]], "-", color=color, label=f"node {n['node']}"
        )
        ax.plot(rounds, [p["recomputed"] for p in n["curve"]], "o", color=color, fillstyle="none")
    for budget in sorted({n["target_epsilon"] for n in nodes}):
        ax.axhline(budget, linestyle="--", color="black", linewidth=1)
        ax.annotate(
            f"budget ε = {budget:g}",
            (0, budget),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (customer level)")
    ax.set_title("ε per node: reported (lines) vs dp-accounting PLD (circles)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=max(1, len(nodes) // 12), loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def plot_canaries(empirical: dict, scores: list[float], included: list[int]) -> str:
    """Histogram of the canaries' scores, included vs not, as a base64 PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    inside = [s for s, i in zip(scores, included, strict=True) if i]
    outside = [s for s, i in zip(scores, included, strict=True) if not i]
    ax.hist([inside, outside], bins=40, label=["included", "not included"], alpha=0.7)
    ax.set_xlabel(f"score: {empirical['score']}"[:90])
    ax.set_ylabel("canaries")
    ax.legend(fontsize=8)
    return _png(fig)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#176b1d;font-weight:bold}.fail{color:#b00020;font-weight:bold}
.banner{padding:.6em 1em;border-radius:6px;font-size:1.2em}.ok{background:#e4f4e4}
.bad{background:#fbe3e6}code{background:#f3f3f3;padding:1px 4px}li{margin:.2em 0}
.muted{color:#666}img{max-width:100%}
"""


def write_html(report: dict, path: Path) -> None:
    """A self-contained HTML page of the audit: inline CSS, plots embedded as base64 PNG."""
    e = html.escape
    verdict = (
        "<div class='banner ok'>Audit passed: every check holds.</div>"
        if report["passed"]
        else "<div class='banner bad'>Audit FAILED: "
        + e(", ".join(c["title"] for c in report["checks"] if not c["passed"]))
        + "</div>"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedrec privacy audit"
        f"</title><style>{CSS}</style></head><body>",
        f"<h1>Privacy audit of <code>{e(report['out'])}</code></h1>",
        verdict,
        f"<p><b>Guarantee:</b> {e(report.get('guarantee', '-'))}</p>",
    ]
    fed = report["federation"]
    if fed:
        parts.append("<h2>Federation level</h2><ul>")
        for key in ("one_node", "all_nodes"):
            g = fed[key]
            here = " <b>(this run's partition)</b>" if fed["applies"] == key else ""
            extra = ""
            if key == "all_nodes":
                b = g["basic_composition"]
                extra = (
                    f"; basic composition of the node statements: ε = "
                    f"{_fmt(b['epsilon'])}, δ = {b['delta']:g}"
                )
            parts.append(
                f"<li>{e(g['unit'])}{here}: ε = {_fmt(g['epsilon'])} at δ = "
                f"{g['delta']:g} ({e(g['how'])}{extra})</li>"
            )
        parts.append("</ul>")
    if report["node_level"]:
        nl = report["node_level"]
        parts.append(
            f"<h2>Node level</h2><p>{e(nl['statement'])} (reported "
            f"{_fmt(nl['reported_epsilon'])}, RDP {_fmt(nl['rdp_epsilon'])}, "
            f"{nl['rounds']} rounds)</p>"
        )
    parts.append("<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>details</th></tr>")
    for c in report["checks"]:
        status = (
            "<span class='pass'>pass</span>" if c["passed"] else ("<span class='fail'>FAIL</span>")
        )
        details = e(c["message"]) + "".join(f"<br>{e(p)}" for p in c["problems"])
        parts.append(
            f"<tr><td>{e(c['title'])}</td><td>{status}</td>"
            f"<td style='text-align:left'>{details}</td></tr>"
        )
    parts.append("</table>")
    if report["nodes"]:
        parts.append(
            "<h2>Per node</h2><p class='muted'>Customer level: one customer's data at "
            "one node. Reported ε is the node's accountant (Opacus PRV); recomputed is "
            "dp-accounting PLD; rel. diff = (reported − recomputed) / recomputed, the "
            "smallest over the node's contributions.</p><table><tr>"
            + "".join(f"<th>{e('contributions' if h == 'n' else h)}</th>" for h in NODE_COLUMNS)
            + "</tr>"
        )
        for n in report["nodes"]:
            cls = "" if n["status"] == "ok" else " class='fail'"
            parts.append(f"<tr{cls}>" + "".join(f"<td>{e(x)}</td>" for x in _node_row(n)) + "</tr>")
        parts.append("</table>")
    plot = plot_epsilon(report)
    if plot:
        parts.append(f"<img alt='epsilon over rounds per node' src='data:image/png;base64,{plot}'>")
    if report["declined"]:
        parts.append(
            "<h2>Declined contributions</h2><ul>"
            + "".join(
                f"<li>node {e(d['node'])}, round {d['round']} (line {d['line']}): "
                f"{e(str(d['reason']))}</li>"
                for d in report["declined"]
            )
            + "</ul>"
        )
    if report["empirical"]:
        parts.append(_empirical_html(report["empirical"], Path(report["out"])))
    if report["notes"]:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report["notes"]) + "</ul>"
        )
    parts.append(
        f"<p class='muted'>{report['entries']} ledger entries; head hash "
        f"<code>{e(str(report['head_hash']))}</code> (record it elsewhere to pin the "
        f"ledger's end). Tolerance {report['tolerance']:.1%}. How to recompute by hand: "
        "docs/privacy-audit.md.</p></body></html>"
    )
    path.write_text("\n".join(parts), encoding="utf-8")


def _empirical_html(emp: dict, out: Path) -> str:
    e = html.escape
    against = (
        f" The formal guarantee it is compared with ({e(emp['compared_with'])}) is "
        f"ε = {_fmt(emp['formal_epsilon'])}."
        if emp["formal_epsilon"] is not None
        else ""
    )
    rows = "".join(
        f"<tr><td>{t['k_plus']}</td><td>{t['k_minus']}</td><td>{t['correct']}/"
        f"{t['guesses']}</td><td>{_fmt(t['epsilon'])}</td></tr>"
        for t in emp["tries"]
    )
    data = read_canaries(out / "canaries.json")
    plot = plot_canaries(emp, data["scores"], data["included"])
    return (
        "<h2>Empirical audit (one training run)</h2>"
        f"<p>With {emp['confidence']:.0%} confidence, ε ≥ <b>{_fmt(emp['epsilon_lower_bound'])}"
        f"</b> at δ = {emp['delta']:g}: {emp['num_canaries']} canaries, each trained on with "
        f"probability 1/2 ({emp['num_included']} were); guessing 'in' for the "
        f"{emp['k_plus']} highest and 'out' for the {emp['k_minus']} lowest scores got "
        f"{emp['correct']} of {emp['guesses']} right (Steinke, Nasr, Jagielski 2023).{against} "
        "A lower bound, usually far below the formal ε: it shows what this attack could "
        "extract, not what the worst case could.</p>"
        f"<p class='muted'>Score: {e(str(emp['score']))}. {emp['bonferroni_tries']} (k+, k−) "
        "pairs tried, Bonferroni-corrected.</p>"
        f"<img alt='canary scores' src='data:image/png;base64,{plot}'>"
        "<details><summary>every (k+, k−) tried</summary><table><tr><th>k+</th><th>k−</th>"
        f"<th>correct</th><th>ε bound</th></tr>{rows}</table></details>"
    )
