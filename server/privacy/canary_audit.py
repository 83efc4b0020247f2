"""Empirical lower bound on epsilon from one training run (Steinke, Nasr, Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run", arXiv 2305.08846).

m canaries are each included in training independently with probability 1/2. After training,
each gets a membership score (higher: more likely included). The auditor guesses "in" for the
k+ highest scores, "out" for the k- lowest and abstains on the rest. If the training is
(epsilon, delta)-DP, the number of correct guesses v out of r is stochastically dominated as in
their Theorem (delta = 0) and its delta > 0 refinement (their Algorithm 2):

    p(epsilon) = P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i,
    q = e^epsilon / (1 + e^epsilon).

p(epsilon) <= beta rejects "(epsilon, delta)-DP" at level beta, and then every smaller epsilon
too, so the largest such epsilon is a lower bound holding with probability 1 - beta.

Which delta: the bound is on epsilon at the given delta. delta = 0 is NOT the conservative
choice: a mechanism that is (epsilon, delta)-DP with delta > 0 need not be epsilon-DP at all, so
a delta = 0 bound may exceed the epsilon the ledger claims at its delta without any bug. Use the
run's delta to compare with the formal guarantee; delta = 0 bounds only pure-DP claims.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from server.privacy.ledger import is_number, json_object


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of v or more correct guesses out of r (m canaries) under (epsilon, delta)-DP."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= Binomial(r, q) < v]
    return min(1.0, tail + 2 * m * delta * float(np.max(window / i)))


def epsilon_from_guesses(m: int, r: int, v: int, beta: float, delta: float = 0.0) -> float:
    """The largest epsilon whose (epsilon, delta)-DP claim v correct out of r rejects at level
    beta (0.0 if none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) <= beta < p(hi)
    while p_value(m, r, v, hi, delta) <= beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo  # every guess right with overwhelming confidence: unbounded in practice
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return lo


def default_k_values(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried by default: k in 10, 20, 50, 100, ... up to m/2, one- and two-sided."""
    ks = [k for k in (int(b * 10**e) for e in range(1, 8) for b in (1, 2, 5)) if k <= m // 2]
    return [pair for k in ks for pair in ((k, 0), (k, k))] or [(m // 2, m - m // 2)]


def max_reachable(m: int, confidence: float = 0.95, delta: float = 0.0) -> float:
    """The largest bound ``m`` canaries can give at all: every guess right, for the best of the
    (k+, k-) pairs :func:`epsilon_lower_bound` tries, at the same confidence and delta."""
    pairs = default_k_values(m)
    beta = (1.0 - confidence) / len(pairs)
    return max(epsilon_from_guesses(m, a + b, a + b, beta, delta) for a, b in pairs)


MAX_CANARIES = 1 << 20  # the search for a conclusive canary count stops here


def canaries_needed(
    epsilon: float, confidence: float = 0.95, delta: float = 0.0, start: int = 100
) -> int | None:
    """The smallest canary count whose :func:`max_reachable` reaches ``epsilon`` (doubling from
    ``start``, then bisection); None when none up to :data:`MAX_CANARIES` does, or when two
    doublings in a row do not raise it (with delta > 0 the 2 m delta term caps the bound; the
    (k+, k-) grid alone can hold it for one doubling)."""
    low, high = 0, max(start, 2)
    reach, best, stalled = max_reachable(high, confidence, delta), 0.0, 0
    while reach < epsilon:
        best, stalled = (reach, 0) if reach > best else (best, stalled + 1)
        if high >= MAX_CANARIES or stalled == 2:
            return None
        low, high = high, 2 * high
        reach = max_reachable(high, confidence, delta)
    while high - low > 1:  # max_reachable(high) >= epsilon > max_reachable(low), or low = 0
        middle = (low + high) // 2
        if max_reachable(middle, confidence, delta) >= epsilon:
            high = middle
        else:
            low = middle
    return high


def epsilon_lower_bound(
    scores: list[float] | np.ndarray,
    included: list[int] | np.ndarray,
    k_values: list[tuple[int, int]] | None = None,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> dict:
    """One-run epsilon lower bound at ``confidence``, best over the (k+, k-) pairs tried.

    Each pair is tested at level (1 - confidence) / len(k_values) (Bonferroni), so the best bound
    holds with probability ``confidence`` however many pairs are tried.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=int)
    m = len(scores)
    if m == 0 or len(included) != m:
        raise ValueError(f"need as many inclusion flags as scores, got {len(included)} and {m}")
    if not set(np.unique(included)) <= {0, 1}:
        raise ValueError("included must hold 0 or 1 for each canary")
    pairs = list(k_values) if k_values is not None else default_k_values(m)
    beta = (1.0 - confidence) / len(pairs)
    order = np.argsort(-scores, kind="stable")  # highest score first
    ranked = included[order]
    tries = []
    for k_plus, k_minus in pairs:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
            raise ValueError(f"bad (k+, k-) = ({k_plus}, {k_minus}) for {m} canaries")
        v = int(ranked[:k_plus].sum() + (1 - ranked[m - k_minus :]).sum())
        r = k_plus + k_minus
        tries.append(
            {
                "k_plus": k_plus,
                "k_minus": k_minus,
                "guesses": r,
                "correct": v,
                "epsilon": epsilon_from_guesses(m, r, v, beta, delta),
            }
        )
    best = max(tries, key=lambda t: t["epsilon"])
    return {
        "epsilon_lower_bound": best["epsilon"],
        "max_reachable": max_reachable(m, confidence, delta),
        "confidence": confidence,
        "delta": delta,
        "num_canaries": m,
        "num_included": int(included.sum()),
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "guesses": best["guesses"],
        "correct": best["correct"],
        "bonferroni_tries": len(pairs),
        "tries": tries,
    }


def write_canaries(path: str | Path, scores: list[float], included: list[int], score: str) -> None:
    """Write ``canaries.json``: the scores, the inclusion flags and what the score measures."""
    scores, included = [float(s) for s in scores], [int(i) for i in included]
    if len(scores) != len(included):
        raise ValueError("need as many inclusion flags as scores")
    data = {"scores": scores, "included": included, "num_canaries": len(scores), "score": score}
    Path(path).write_text(json.dumps(data) + "\n", encoding="utf-8")


def read_canaries(path: str | Path) -> dict:
    """Read and check ``canaries.json``; raises ValueError naming the file and the problem: not
    a JSON object (read as the ledger's lines are, :func:`server.privacy.ledger.json_object`),
    a field missing, a score that is not a finite number, a flag that is not 0 or 1, or
    lengths that disagree. A tampered file fails the empirical check, never crashes it."""
    try:
        data = json_object(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    lacking = [k for k in ("scores", "included", "num_canaries", "score") if k not in data]
    if lacking:
        raise ValueError(f"{path}: missing {', '.join(lacking)}")
    scores, included = data["scores"], data["included"]
    if not (isinstance(scores, list) and all(map(is_number, scores))):
        raise ValueError(f"{path}: scores must be a list of finite numbers")
    if not (isinstance(included, list) and all(flag in (0, 1) for flag in included)):
        raise ValueError(f"{path}: included must be a list of 0 or 1, one for each canary")
    if not len(scores) == len(included) == data["num_canaries"]:
        raise ValueError(f"{path}: scores, included and num_canaries disagree in length")
    return data
