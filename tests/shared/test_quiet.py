"""Third-party messages nobody can act on are filtered at their source (shared/runs/quiet.py), in
this process and in Ray's workers; the project's own warnings still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from shared.runs.quiet import quiet_third_party, worker_environment

SECURE_RNG = "Secure RNG turned off. This is perfectly fine for experimentation"


def warn_from(module: str, message: str, category: type[Warning] = UserWarning) -> None:
    warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)


def test_named_warnings_are_filtered_and_others_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warn_from("opacus.privacy_engine", SECURE_RNG)
        warn_from(
            "opacus.accountants.analysis.prv.prvs",
            "divide by zero encountered in log",
            RuntimeWarning,
        )
        warn_from(
            "shared.recommender.training", "divide by zero encountered in log", RuntimeWarning
        )
        warn_from("opacus.privacy_engine", "PrivacyEngine detected new dataset object")
    assert [str(w.message) for w in caught] == [
        "divide by zero encountered in log",  # the project's own
        "PrivacyEngine detected new dataset object",  # not a known, harmless one
    ]


def test_flower_deprecation_of_run_simulation_is_dropped() -> None:
    quiet_third_party()
    flower = logging.getLogger("flwr")
    kept = [
        flower.filter(logging.LogRecord("flwr", logging.WARNING, "", 1, m, (), None))
        for m in (
            "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed",
            "Manually terminating ClientAppActor",
            "a node failed",
        )
    ]
    assert kept[:2] == [False, False] and kept[2]
    assert not flower.propagate  # Flower prints with its own handler, once


def test_workers_get_the_same_filters() -> None:
    env = {**os.environ, **worker_environment()}
    code = (
        "import warnings\n"
        f"warnings.warn_explicit({SECURE_RNG!r}, UserWarning, 'p.py', 1, "
        "module='opacus.privacy_engine')\n"
        "warnings.warn_explicit('kept', UserWarning, 'p.py', 1, "
        "module='shared.recommender.training')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "Secure RNG" not in result.stderr and "kept" in result.stderr
    assert env["FLWR_LOG_LEVEL"] == "ERROR"
