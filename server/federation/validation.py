"""The nodes' validation answers, which choose a deployment's rounds (without DP;
docs/evaluation.md).

Each node answers every round's evaluation, the public start's (round 0) too, with the exact
mean NDCG@10 and HR@10 over its validation customers and how many they are
(:func:`node_validation`: each speaks for at most the validation customers the server expects
of its node and ``row-clip`` times the median node's; a name given by two replies of a round
speaks for none). Their customer-weighted mean (:func:`validation_mean`) is reported; what
chooses the round is robust to a liar (:func:`robust_validation`): the start's mean plus the
customer-weighted median over nodes of each node's gain over its own answer for the start.
Nodes holding less than half the weight cannot move that median beyond what the honest nodes'
gains span, whatever they answer (exactly half moves it half-way to theirs); where the nodes
rank the rounds alike it keeps the round the mean keeps.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message

from server.federation.aggregation import weight_bound
from shared.recommender.metrics import EVALUATED

log = logging.getLogger("fedrec.server")

Answers = dict[str, dict]  # node -> {"users": its weight, "hr@10": ..., "ndcg@10": ...}


def node_validation(
    server_round: int,
    replies: Iterable[Message],
    sender: Callable[[Message], str],
    limit: Callable[[Message], float],
    multiple: float,
) -> Answers:
    """Each node's (``sender(reply)``) exact validation answer (:func:`validation_answer`):
    ``users``, its validation customers, at most ``limit(reply)`` and at most ``multiple``
    times the median node's (:func:`weight_bound`, as the aggregation bounds a node's weight),
    and its mean of each evaluated metric. A reply without one, or with one out of range, is
    left out, and so is every answer of a node named by more than one reply (without a registry
    the name is the report's own: a reply naming another node would replace its answer)."""
    given = [(sender(r), a) for r in replies if (a := validation_answer(server_round, r, limit))]
    named = Counter(node for node, _ in given)
    if twice := sorted(node for node, times in named.items() if times > 1):
        log.warning(
            "round %d: validation answers left out: %s each named by more than one reply",
            server_round,
            ", ".join(twice),
        )
    answers = {node: answer for node, answer in given if named[node] == 1}
    bound = weight_bound([a["users"] for a in answers.values()], multiple)
    for answer in answers.values():
        answer["users"] = min(answer["users"], bound)
    return answers


def validation_answer(
    server_round: int, reply: Message, limit: Callable[[Message], float]
) -> dict | None:
    """``reply``'s validation answer, ``{"users", "hr@10", "ndcg@10"}``, its customers held to
    ``limit(reply)``; None when it carries none or one out of range."""
    if reply.has_error() or "metrics" not in reply.content:
        return None
    metrics = dict(reply.content["metrics"])
    values = [metrics.get(f"valid-{k}") for k in ("customers", *EVALUATED)]
    count, *rest = values
    if count is None:
        return None
    if not (
        all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        and count >= 0
        and all(0 <= v <= 1 for v in rest)
    ):
        log.warning("round %d: a validation reply out of range", server_round)
        return None
    return {"users": min(count, limit(reply)), **dict(zip(EVALUATED, rest, strict=True))}


def validation_mean(answers: Answers) -> dict:
    """``{"users", "hr@10", "ndcg@10"}``: the answers' means weighted by their customers
    ({} when they speak for none)."""
    customers, sums = 0.0, dict.fromkeys(EVALUATED, 0.0)
    for answer in answers.values():
        customers += answer["users"]
        for name in EVALUATED:
            sums[name] += answer[name] * answer["users"]
    if customers <= 0:
        return {}
    return {"users": round(customers), **{k: v / customers for k, v in sums.items()}}


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The median of ``values`` weighted by ``weights`` (positive): the value where half the
    weight lies on either side, the midpoint of two values where the halves meet between them
    (two nodes of equal weight: their mean; one node: its value; nodes holding exactly half the
    weight move it half-way from the others' nearest value to theirs)."""
    order = np.argsort(values, kind="stable")
    ordered = np.asarray(values, dtype=np.float64)[order]
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    half = cumulative[-1] / 2
    low = ordered[np.searchsorted(cumulative, half, side="left")]
    high = ordered[np.searchsorted(cumulative, half, side="right")]
    return float((low + high) / 2)


def robust_validation(answers: Answers, start: Answers) -> dict | None:
    """What chooses the round from the nodes' ``answers`` for it: for each metric, the start's
    mean (:func:`validation_mean` of ``start``, the nodes' answers for the public start) plus
    the median over nodes, weighted by the customers each speaks for this round, of each node's
    gain over its own answer for the start; ``users``: the customers of the nodes that
    answered both. The start's own, and a run whose start no node answered, is the mean of
    ``answers``; None when none speaks for anyone."""
    if not start:
        return validation_mean(answers) or None
    compared = [n for n, a in answers.items() if a["users"] > 0 and start.get(n, {}).get("users")]
    if not compared:
        return None
    level = validation_mean(start)
    weights = [answers[n]["users"] for n in compared]
    gains = {
        k: weighted_median([answers[n][k] - start[n][k] for n in compared], weights)
        for k in EVALUATED
    }
    return {"users": round(sum(weights)), **{k: level[k] + gains[k] for k in EVALUATED}}
