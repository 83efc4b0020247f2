"""Stated privacy figures, rounded up: a printed epsilon or delta is never below the spent one."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Context, Decimal

# enough digits for any float's integer part (up to 1.8e308) and its decimals: quantize raises
# InvalidOperation when the result needs more than the context's precision (1e25 at 3 decimals)
_EXACT = Context(prec=400)


def up(x: float, decimals: int) -> str:
    """``x`` to ``decimals`` decimals, rounded up: epsilon 7.9949 is ``7.995`` at 3 and ``8.00``
    at 2, never ``7.99`` (below what was spent). Infinity (a spending nothing bounds) is
    ``inf``."""
    if not math.isfinite(x):
        return str(float(x))
    quantum = Decimal(1).scaleb(-decimals)
    return str(Decimal(repr(float(x))).quantize(quantum, rounding=ROUND_CEILING, context=_EXACT))


def up_significant(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits (as ``format(x, ".3g")`` writes them), rounded
    up: delta 0.00033333 is ``0.000334`` at 3, never ``0.000333``."""
    if not math.isfinite(x):
        return str(float(x))
    exact = Decimal(repr(float(x)))
    if exact == 0:
        return "0"
    quantum = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return format(float(exact.quantize(quantum, rounding=ROUND_CEILING)), f".{digits}g")
