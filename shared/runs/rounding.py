"""Stated privacy figures, rounded up: a printed epsilon or delta is never below the spent one."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal


def up(x: float, decimals: int) -> str:
    """``x`` to ``decimals`` decimals, rounded up: epsilon 7.9949 is ``7.995`` at 3 and ``8.00``
    at 2, never ``7.99`` (below what was spent)."""
    return str(Decimal(repr(x)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_CEILING))


def up_significant(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits (as ``format(x, ".3g")`` writes them), rounded
    up: delta 0.00033333 is ``0.000334`` at 3, never ``0.000333``."""
    exact = Decimal(repr(x))
    if exact == 0:
        return "0"
    quantum = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return format(float(exact.quantize(quantum, rounding=ROUND_CEILING)), f".{digits}g")
