"""The start guard (``dp-guard``): a private federation ships its public start rather than a
model its nodes' customers rank worse.

Under DP the rounds are fixed (``dp-rounds``) and every node adds noise to what it trains.
Where the nodes' data cannot lift the model above that noise (a small budget, a catalogue
whose products each sell at one merchant), the noise walks the model below the public start
it began from: merchants on Amazon Beauty at ε = 2 ended 0.0346 against their start's 0.0429,
ten regional nodes at ε = 1 0.0397 (docs/privacy.md, "The start guard"). A node that joined
would get less than not joining.

After the last private round every node that answers gives one private comparison
(client/node.py, ``guard_node``): the sum over its customers of NDCG@10 of the rounds' model
less that of the start, each on the customer's last event (which the node held out of its
training for it), plus Gaussian noise of std ``dp-guard-noise-scale`` x sqrt(its declared
customers) (one customer moves the sum by at most 1). The release is part of each node's plan
from its first private step, so its DP-SGD noise is calibrated for it, and it is in the ledger
and the audit like any other. The server adds the answers (their noise: std
``dp-guard-noise-scale`` x sqrt(all the nodes' customers), however they are split among nodes:
a federation of many small nodes is judged as finely as one of a few large ones) and ships
the start only where the sum lies more than :data:`GUARD_MARGIN` of those standard deviations
below zero: the customers then say, beyond the comparison's own noise, that the rounds made
the model worse. A gain or a loss within the noise keeps the rounds' model. Deciding on the
noisy answers is post-processing: it costs nothing beyond the releases.

A node's answer can be a lie (a malicious node). Each is bounded by what its customers could
move it (its declared customers, as the registry holds them where there is one, plus four
noise standard deviations). Real gains are about a hundredth of the customers, so a node
larger than the honest sum decides the verdict either way: it can force the public start, or
keep rounds its customers would have ranked worse; never a third model (docs/privacy.md).

What it cannot see (docs/privacy.md, "The start guard"): each node ranks its own part of its
customers' histories, so a loss that only whole histories show passes (measured on Amazon
Beauty's merchants, whose rounds' model ranks each merchant's own part better than the start
and whole histories worse). It catches a model walked down on every view (measured on a dense
shop).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from flwr.app import Message

from shared.federation.reports import ReportError, parse_report, release_value_problem

if TYPE_CHECKING:  # the round loop passes its Federation; exchange imports this module
    from server.federation.exchange import Federation
    from shared.runs.config import RunConfig

log = logging.getLogger("fedrec.server")

GUARD_ROUND = "evaluate.guard"  # the nodes' handler: client/client_app.py
# the start is shipped when the summed answer is below minus this many of its noise's standard
# deviations: a rounds' gain within the noise is never thrown away for the start
GUARD_MARGIN = 1.0
ANSWER_SPREAD = 4.0  # an answer may lie this many noise standard deviations beyond its sum


def bounded_answer(
    reply: Message, config: RunConfig, declared: float
) -> tuple[float, float] | None:
    """The reply's noisy gain and its noise's std: the std the run gives a node of its
    customers (``RunConfig.guard_noise``), the gain bounded by what those customers could move
    it (plus :data:`ANSWER_SPREAD` of those stds); its customers are the fewer of its signed
    release's and ``declared``. None when the reply holds no finite answer or no release to
    say whose it is, or a release no accountant recomputes (a sample rate or noise of 0)."""
    if reply.has_error() or "metrics" not in reply.content or "privacy" not in reply.content:
        return None
    answer = dict(reply.content["metrics"]).get("noisy_gain")
    if not isinstance(answer, int | float) or not math.isfinite(answer):
        return None
    try:
        release = parse_report(dict(reply.content["privacy"])).release
    except ReportError:
        return None
    if release is None or release.purpose != "guard" or release_value_problem(release.as_dict()):
        return None  # not a guard release, or one the audit could not recompute
    customers = min(float(release.num_customers), declared)
    sigma = config.guard_noise(customers)
    bound = customers + ANSWER_SPREAD * sigma
    return max(-bound, min(bound, float(answer))), sigma


def decide(answers: list[tuple[float, float]]) -> dict:
    """The guard's verdict from the nodes' bounded (answer, noise std) pairs: ``shipped``
    "start" when the answers' sum is below minus :data:`GUARD_MARGIN` x its noise's std (the
    root of the summed variances), else "rounds" (also when no node answered: nothing says
    the rounds did harm)."""
    if not answers:
        return {"nodes": 0, "shipped": "rounds", "why": "no node answered the comparison"}
    total = float(sum(answer for answer, _ in answers))
    noise = math.sqrt(sum(sigma**2 for _, sigma in answers))
    start = total < -GUARD_MARGIN * noise
    return {
        "nodes": len(answers),
        "noisy_gain": total,  # the summed NDCG@10 of the rounds' model less the start's
        "noise_std": noise,
        "margin_std": GUARD_MARGIN,
        "shipped": "start" if start else "rounds",
        "why": (
            f"the nodes' customers rank the rounds' model worse than the public start by "
            f"{-total:.1f} summed NDCG@10, beyond {GUARD_MARGIN:g} x the noise's {noise:.1f}"
            if start
            else f"the summed gain {total:.1f} is not below -{GUARD_MARGIN:g} x the noise's "
            f"{noise:.1f}"
        ),
    }


def guard_start(
    federation: Federation,
    server_round: int,
    state: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
) -> dict:
    """Ask every node for its private comparison of ``state`` with ``start`` (recorded in the
    ledger as ``server_round``'s guard releases before anything is read) and decide."""
    replies = federation.ask(server_round, state, GUARD_ROUND, start=start)
    answers = []
    for reply in replies:
        declared = federation.strategy.declared_customers(reply)
        if (answer := bounded_answer(reply, federation.config, declared)) is not None:
            answers.append(answer)
    verdict = decide(answers)
    shipped = "the public start" if verdict["shipped"] == "start" else "the rounds' model"
    log.info("start guard: %s is shipped (%s)", shipped, verdict["why"])
    return verdict
