"""The customer-level budget: what each node of a run is asked to keep, and what the
federation's releases spent (:func:`federation_privacy`).

In a regional federation a customer's data is at one node: each node keeps the run's whole
``target-epsilon``. Elsewhere (merchants) a customer may have data at every node, and what the
run promises is the composition over all of them (server/privacy/accounting.py,
``federation_guarantee``). Asking each of n nodes for ``target / n`` keeps that by basic
composition, and spends far less: ten merchants of Amazon Beauty asked 0.2 each composed to
0.58, not 2, by PLD. Where every node's public customer figure is known (a simulation's
partitions, a deployment's registry), the server asks each node for the largest equal budget
whose plans, composed by PLD, stay within the target (:func:`node_budget`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from server.privacy import accounting
from server.privacy.claims import planned_floor, refused_claims, with_claims
from server.privacy.deltas import declared_customers, delta_warning
from server.privacy.ledger import PrivacyLedger
from server.privacy.ledger_gaps import outstanding_releases
from shared.federation.node_directory import NodeInfo
from shared.runs.config import RunConfig
from shared.runs.rounding import up, up_significant

if TYPE_CHECKING:
    from server.federation.registry import Registry

# the run_start ledger field stating the budget each node is asked to keep (a resumed run reads
# it back: the search takes minutes for a hundred nodes)
BUDGET_KEY = "budget_per_node"
NODE_UNIT = "one customer's entire history at one node (every event of one customer there)"


def node_plan(config: RunConfig, customers: int) -> accounting.NodePlan:
    """The private plan ``config`` gives a node of ``customers`` declared customers (what the
    node calibrates its noise for: client/node.py, ``noise_multiplier``)."""
    q, steps = accounting.plan_steps(config.dp_batch_size, customers, config.dp_local_epochs)
    encoder = None
    if config.text_finetune_layers:
        encoder_q, encoder_steps = accounting.plan_steps(config.dp_encoder_batch, customers, 1)
        encoder = (encoder_q, encoder_steps * config.text_finetune_rounds)
    return accounting.NodePlan(
        q,
        steps,
        config.dp_rounds,
        config.gaussian_releases(customers),
        encoder,
        config.customer_delta(customers),
    )


def node_budget(config: RunConfig, customers: list[int | None] | None = None) -> float:
    """The epsilon per customer each node is asked to keep (the request a node receives
    carries it as its ``target_epsilon``; a node keeps less where its own policy caps it,
    client/policy.py): the run's ``target-epsilon`` in a regional federation; else, with
    every node's public ``customers`` figure, the largest equal budget whose plans composed
    by PLD spend at most the target (:func:`accounting.split_budget`), and without them an
    equal share, ``target / clients`` (basic composition)."""
    if config.partition == "regional":
        return config.target_epsilon
    if not customers or any(c is None or c < 1 for c in customers):
        return config.target_epsilon / max(config.clients, 1)
    plans = [node_plan(config, int(c)) for c in customers]
    return accounting.split_budget(config.target_epsilon, plans, config.delta or None)


def node_customers(partitions: Path | None, registry: Registry | None) -> list[int | None] | None:
    """Every node's public customer figure: a deployment's registry, else a simulation's
    partitions (their ``node.json``); None when neither is known."""
    if registry is not None:
        return [node.customers for node in registry.nodes.values()]
    if partitions is not None:
        return [NodeInfo.read(d).customers for d in sorted(Path(partitions).glob("node-*"))]
    return None


def federation_privacy(ledger: PrivacyLedger, config: RunConfig) -> dict:
    """The guarantee per node and for the federation, from the ledger's releases. The headline
    ``epsilon`` is the federation's guarantee that applies (the worst node when the run is
    regional and every node vouched in its signed releases that its customers are its own
    alone, the composition over every node otherwise: ``federation.why`` says which), and
    never below what a refused report claims spent (``unverified``: the largest epsilon each
    such node claimed, never recomputed; where every node composes, each node's claim added:
    server/privacy/claims.py). A private request a node left unanswered counts as
    spent until a later release settles it (``outstanding``, server/privacy/ledger_gaps.py);
    while a node's spending is bounded by none of its releases (``unbounded``), the headline is
    at least the run's target (what the node's plan keeps, if it followed it). A delta that
    protects no one for certain (at least 1 / the customers the nodes declared:
    server/privacy/deltas.py) is warned of in the statement and in ``warning``, which the
    model card prints and the command's summary repeats."""
    contributions = [e for e in ledger.entries if e["kind"] == "contribution"]
    refused = refused_claims(e for e in ledger.entries if e["kind"] == "unverified")
    claims = {node: epsilon for node, (epsilon, _) in refused.items()}
    unverified = {"unverified": claims} if claims else {}
    nodes: dict[str, dict] = {}
    for entry in contributions:
        nodes[entry["node"]] = {
            "epsilon": entry["epsilon"],
            "delta": entry["delta"],
            "contributions": entry["contribution_index"] + 1,
        }
    copies, unbounded = outstanding_releases(ledger.entries, partial(_answer_sigma, config))
    for copy in copies:
        nodes[copy["node"]]["outstanding"] = nodes[copy["node"]].get("outstanding", 0) + 1
    unanswered = _unanswered_statement(copies, unbounded, config.target_epsilon)
    never = {"unbounded": unbounded} if unbounded else {}
    if not contributions:
        claim = max(claims.values(), default=None)
        statement = "No node contributed." + (
            f" Refused reports claim up to epsilon {up(claim, 3)} ('unverified')." if claims else ""
        )
        # nothing recorded bounds an unanswered node's spending but its plan: the target, or
        # in a regional run (each node asked the whole target, none vouched) the target at each
        # node that spent, a refused one's too; no node vouched, so the claims add up
        # (server/privacy/claims.py)
        whole = len(set(unbounded) | set(claims)) if config.partition == "regional" else 1
        floor = planned_floor(config.target_epsilon, whole if unbounded else 0, refused)
        return {
            "unit": NODE_UNIT,
            "per_node": {},
            **({"epsilon": floor} if claims or unbounded else {}),
            **unverified,
            **never,
            "statement": statement + unanswered,
        }
    # a node whose reports were refused vouched for nothing it signed (server/privacy/claims.py)
    federation = accounting.federation_guarantee(
        contributions + copies, config.delta or None, config.partition, [*unbounded, *claims]
    )
    federation = with_claims(federation, refused)
    epsilon, delta = federation["epsilon"], federation[federation["applies"]]["delta"]
    # an unbounded node kept its plan at most: the target, or, where every node was asked the
    # whole target (regional) but the composition applies, the target at each node (a node
    # whose reports were refused spent too)
    whole = config.partition == "regional" and federation["applies"] == "all_nodes"
    spent = set(nodes) | set(unbounded) | set(claims)
    floor = planned_floor(config.target_epsilon, len(spent) if whole else 1, refused)
    epsilon = max([epsilon, *([floor] if unbounded else [])])
    warning = delta_warning(delta, declared_customers(contributions))
    statement = (
        f"Every node trained with DP-SGD ({len(nodes)} nodes, {config.partition} partition): "
        f"({up(epsilon, 3)}, {up_significant(delta, 3)})-differential privacy for each customer, "
        "the unit "
        f"being {federation['unit']}; each node's own guarantee is in 'per_node'."
    )
    if config.partition == "regional" and federation["unvouched"]:
        statement += f" Not the worst node's: {federation['why']}."
    if claims:
        statement += (
            f" Refused reports of {len(claims)} node(s) claim spending the server could not "
            "verify ('unverified'); epsilon is never below what they claim, and where every "
            "node's spending composes their claims are added to it."
        )
    statement += unanswered + (f" {warning}" if warning else "")
    return {
        "unit": federation["unit"],
        "accountant": "prv (opacus) at each node; the federation by dp-accounting PLD",
        "delta": delta,
        "epsilon": epsilon,
        "target_epsilon": config.target_epsilon,
        "per_node": nodes,
        "federation": federation,
        **unverified,
        **never,
        **({"warning": warning} if warning else {}),
        "statement": statement,
    }


def _unanswered_statement(copies: list[dict], unbounded: list[str], target: float) -> str:
    """What the statement says of private requests left unanswered (nothing when none are)."""
    said = ""
    if copies:
        said += (
            f" {len(copies)} private request(s) of {len({c['node'] for c in copies})} node(s) "
            "went unanswered ('outstanding'): each is counted as spent, at the node's "
            "costliest release of its purpose (an answer it never gave: its plan's one)."
        )
    if unbounded:
        said += (
            f" {len(unbounded)} node(s) left spending that no release of theirs in this "
            "ledger bounds ('unbounded': a request unanswered by a node that never contributed "
            "or never released one of its purpose, or an index gap): what they spent is in "
            f"their own accountants; epsilon is at least the run's target {target:g}, what "
            "their plans keep if they followed them."
        )
    return said


def _answer_sigma(config: RunConfig, purpose: str, customers: float) -> float | None:
    """The noise ``config`` plans for a private answer of ``purpose`` by a node of
    ``customers`` declared customers (None: not an answer)."""
    if purpose == "evaluation":
        return config.eval_noise_multiplier
    return config.guard_noise(customers) if purpose == "guard" else None
