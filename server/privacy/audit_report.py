"""Presentation of a privacy audit report: the terminal summary, the epsilon and canary plots,
and the self-contained HTML page (server/privacy/audit.py builds the report)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.privacy.audit_checks import is_number
from server.privacy.canary_audit import read_canaries
from shared.runs.console import console as log_console
from shared.runs.rounding import up, up_significant

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as strings, for strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if is_number(x) else ("inf" if x == math.inf else "-")


def _epsilon(x: Any) -> str:
    """A spent or guaranteed epsilon to 3 decimals, rounded up (never below what was spent)."""
    return up(x, 3) if is_number(x) else _fmt(x)


def _delta(x: Any) -> str:
    """A delta to 3 significant digits, rounded up (a node's own delta, 1 / (10 x customers),
    has 17)."""
    return up_significant(x, 3) if is_number(x) else _fmt(x)


def _other_statement(fed: dict) -> dict:
    """The federation statement that does not apply."""
    return fed["all_nodes" if fed["applies"] == "one_node" else "one_node"]


def _rounds(rounds: list[int]) -> str:
    return f"{min(rounds)}-{max(rounds)}" if rounds else "-"


def _node_row(n: dict) -> list[str]:
    return [
        n["node"],
        str(n["contributions"]),
        _rounds(n.get("rounds", [])),
        _epsilon(n.get("reported_epsilon")),
        _epsilon(n.get("pld_epsilon")),
        _epsilon(n.get("rdp_epsilon")),
        _fmt(n.get("rel_diff"), "+.2%"),
        _delta(n.get("delta")),
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
    "δ",
    "budget",
    "status",
]


def print_summary(report: dict) -> None:
    """The audit on the terminal: a rich table per node, the checks and the guarantee."""
    from rich import box
    from rich.table import Table

    console = log_console()
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
    marks = {
        "pass": "[green]PASS[/green]",
        "fail": "[red]FAIL[/red]",
        "warn": "[yellow]WARNING[/yellow]",
    }
    for c in report["checks"]:
        mark = marks.get(c["status"], "[yellow]INCONCLUSIVE[/yellow]")
        console.print(f"{mark} {c['title']}: {c['message']}", highlight=False)
        for p in c["problems"][:20]:
            console.print(f"     {p}", highlight=False)
        if len(c["problems"]) > 20:
            console.print(f"     ... {len(c['problems']) - 20} more in audit.json")
    for kind in ("declined", "refused"):
        for d in report[kind]:
            console.print(
                f"{kind}: node {d['node']}, round {d['round']}: {d['reason']}", highlight=False
            )
    console.print(f"[bold]guarantee:[/bold] {report.get('guarantee', '-')}", highlight=False)
    if report["federation"]:
        g = _other_statement(report["federation"])
        console.print(
            f"  (not the one that applies: {g['unit']}: ε = {_epsilon(g['epsilon'])} at "
            f"δ = {_delta(g['delta'])}, {g['how']})",
            highlight=False,
        )
    if report["empirical"]:
        e = report["empirical"]
        console.print(
            f"[bold]empirical:[/bold] ε ≥ {e['epsilon_lower_bound']:.3f} with "
            f"{e['confidence']:.0%} confidence at δ = {_delta(e['delta'])} "
            f"({e['num_canaries']} canaries, {e['correct']}/{e['guesses']} guesses right; "
            f"at most ε ≥ {e['max_reachable']:.3f} reachable with these canaries)",
            highlight=False,
        )
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    if failed:
        console.print(
            "[red bold]audit FAILED[/red bold]: "
            + "; ".join(f"{c['name']} ({c['problems'][0]})" for c in failed),
            highlight=False,
        )
    else:
        open_checks = [c["name"] for c in report["checks"] if c["status"] == "inconclusive"]
        console.print(
            "[green bold]audit passed[/green bold]: "
            + (f"no check fails ({', '.join(open_checks)} inconclusive)" if open_checks else "")
            + ("" if open_checks else "every check holds")
            + _warned(report)
        )


def _warned(report: dict) -> str:
    """What the passed verdict adds for the checks that warn (nothing when none does)."""
    warned = [c["name"] for c in report["checks"] if c["status"] == "warn"]
    return f"; WARNING from {', '.join(warned)}: read it above" if warned else ""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_epsilon(report: dict) -> str | None:
    """:func:`epsilon_figure` as a base64 PNG (None: no node has a curve)."""
    fig = epsilon_figure(report)
    return _png(fig) if fig is not None else None


def epsilon_figure(report: dict) -> Figure | None:
    """Epsilon over rounds per node (reported: lines, PLD: markers, budget: dashed)."""
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
    budgets = sorted({n["target_epsilon"] for n in nodes if is_number(n["target_epsilon"])})
    for budget in budgets:
        ax.axhline(budget, linestyle="--", color="black", linewidth=1)
        ax.annotate(  # below its line, inside the axes: clear of the title above them
            f"budget ε = {budget:g}",
            (0, budget),
            xycoords=("axes fraction", "data"),
            xytext=(4, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = max([p["reported"] for n in nodes for p in n["curve"]] + budgets)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (customer level)")
    ax.set_title("ε per node: reported (lines) vs dp-accounting PLD (circles)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=max(1, len(nodes) // 12), loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


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
.muted{color:#666}img{max-width:100%}.open{color:#8a5a00;font-weight:bold}
"""


def write_html(report: dict, path: Path) -> None:
    """A self-contained HTML page of the audit: inline CSS, plots embedded as base64 PNG."""
    e = html.escape
    open_checks = [c["title"] for c in report["checks"] if c["status"] == "inconclusive"]
    verdict = (
        "<div class='banner ok'>Audit passed: "
        + (
            f"no check fails ({e(', '.join(open_checks))}: inconclusive)."
            if open_checks
            else "every check holds."
        )
        + e(_warned(report))
        + "</div>"
        if report["passed"]
        else "<div class='banner bad'>Audit FAILED: "
        + e(", ".join(c["title"] for c in report["checks"] if c["status"] == "fail"))
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
            here = f" <b>(applies: {e(fed['why'])})</b>" if fed["applies"] == key else ""
            extra = ""
            if key == "all_nodes":
                b = g["basic_composition"]
                extra = (
                    f"; basic composition of the node statements: ε = "
                    f"{_epsilon(b['epsilon'])}, δ = {_delta(b['delta'])}"
                )
            parts.append(
                f"<li>{e(g['unit'])}{here}: ε = {_epsilon(g['epsilon'])} at δ = "
                f"{_delta(g['delta'])} ({e(g['how'])}{extra})</li>"
            )
        parts.append("</ul>")
    if report["node_level"]:
        nl = report["node_level"]
        parts.append(
            f"<h2>Node level</h2><p>{e(nl['statement'])} (reported "
            f"{_epsilon(nl['reported_epsilon'])}, RDP {_epsilon(nl['rdp_epsilon'])}, "
            f"{nl['rounds']} rounds)</p>"
        )
    parts.append("<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>details</th></tr>")
    for c in report["checks"]:
        status = {
            "pass": "<span class='pass'>pass</span>",
            "fail": "<span class='fail'>FAIL</span>",
            "warn": "<span class='open'>WARNING</span>",
        }.get(c["status"], "<span class='open'>inconclusive</span>")
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
    held = [(kind, d) for kind in ("declined", "refused") for d in report[kind]]
    if held:
        parts.append(
            "<h2>Declined and refused contributions</h2><p class='muted'>Declined: the node "
            "would have passed its budget. Refused: the request was weaker than the node's "
            "privacy policy. Neither is a failure.</p><ul>"
            + "".join(
                f"<li>{kind}: node {e(d['node'])}, round {d['round']} (line {d['line']}): "
                f"{e(str(d['reason']))}</li>"
                for kind, d in held
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
        f"ε = {_epsilon(emp['formal_epsilon'])}."
        if emp["formal_epsilon"] is not None
        else ""
    )
    rows = "".join(
        f"<tr><td>{t['k_plus']}</td><td>{t['k_minus']}</td><td>{t['correct']}/"
        f"{t['guesses']}</td><td>{_fmt(t['epsilon'])}</td></tr>"
        for t in emp["tries"]
    )
    verdicts = {
        "pass": "Conclusive: the bound could have exceeded the formal ε, and did not.",
        "fail": "The bound exceeds the formal ε.",
        "inconclusive": "Inconclusive: not a confirmation of the formal ε.",
    }
    verdict = verdicts.get(emp["status"], "No formal guarantee to compare with.")
    need = ""
    if emp["status"] == "inconclusive":
        needed = emp["canaries_needed"]
        need = (
            f" A conclusive check needs {needed:,} canaries."
            if needed
            else " No canary count reaches the formal ε at this δ."
        )
    data = read_canaries(out / "canaries.json")
    plot = plot_canaries(emp, data["scores"], data["included"])
    return (
        "<h2>Empirical audit (one training run)</h2>"
        f"<p>With {emp['confidence']:.0%} confidence, ε ≥ <b>{_fmt(emp['epsilon_lower_bound'])}"
        f"</b> at δ = {_delta(emp['delta'])}: {emp['num_canaries']} canaries, each trained on with "
        f"probability 1/2 ({emp['num_included']} were); guessing 'in' for the "
        f"{emp['k_plus']} highest and 'out' for the {emp['k_minus']} lowest scores got "
        f"{emp['correct']} of {emp['guesses']} right (Steinke, Nasr, Jagielski 2023).{against} "
        "A lower bound, usually far below the formal ε: it shows what this attack could "
        "extract, not what the worst case could.</p>"
        f"<p><b>{e(verdict)}</b> Even if every guess were right, {emp['num_canaries']} "
        f"canaries could show at most ε ≥ {_fmt(emp['max_reachable'])} at this confidence "
        f"and δ.{e(need)}</p>"
        f"<p class='muted'>Score: {e(str(emp['score']))}. {emp['bonferroni_tries']} (k+, k−) "
        "pairs tried, Bonferroni-corrected.</p>"
        f"<img alt='canary scores' src='data:image/png;base64,{plot}'>"
        "<details><summary>every (k+, k−) tried</summary><table><tr><th>k+</th><th>k−</th>"
        f"<th>correct</th><th>ε bound</th></tr>{rows}</table></details>"
    )
