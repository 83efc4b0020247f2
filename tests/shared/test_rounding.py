"""Stated privacy figures are rounded up, never to the nearest (which can be below)."""

from __future__ import annotations

import numpy as np

from shared.runs.rounding import up, up_significant


def test_epsilon_is_rounded_up_and_exact_decimals_stay() -> None:
    assert up(7.99489, 2) == "8.00" and up(7.99489, 3) == "7.995"
    assert up(7.9972941520714835, 3) == "7.998"  # ".3f" printed 7.997
    assert up(1.1, 2) == "1.10" and up(8.0, 3) == "8.000"  # no float residue pushed up


def test_delta_is_rounded_up_in_significant_digits() -> None:
    assert up_significant(1 / 3000, 2) == "0.00034" and up_significant(1 / 3000, 3) == "0.000334"
    assert up_significant(0.00018867924528301886, 3) == "0.000189"
    assert up_significant(1e-5, 3) == "1e-05" and up_significant(0.0, 3) == "0"


def test_unbounded_and_huge_figures_are_stated_not_raised() -> None:
    """An audit of a ledger whose spending nothing bounds states epsilon inf: Decimal's
    quantize raised InvalidOperation for inf (and for 1e25 at 3 decimals), a traceback."""
    assert up(float("inf"), 3) == "inf" and up_significant(float("inf"), 3) == "inf"
    assert up(1e25, 3) == "10000000000000000000000000.000"
    assert up(1.7976931348623157e308, 2).endswith(".00")


def test_numpy_figures_are_rounded_as_floats() -> None:
    """An accountant's numpy float: Decimal(repr(np.float64(x))) read 'np.float64(...)' and
    raised InvalidOperation."""
    assert up(np.float64(7.9949), 3) == "7.995" and up_significant(np.float64(1 / 3000), 3) == (
        "0.000334"
    )
