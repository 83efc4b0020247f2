"""Third-party messages a user cannot act on, filtered at their source: each filter names the
package and the message, so the project's own warnings and anything unexpected still show.

:func:`quiet_third_party` installs the filters in this process; Ray's workers are separate
processes that inherit the environment, so :func:`worker_environment` carries the same warning
filters (``PYTHONWARNINGS``) and Flower's log level to them. :func:`show_worker_output` stops
Ray forwarding its workers' output to this process while a run's engine is torn down.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message prefix, category, module that emits it)
WARNING_FILTERS: tuple[tuple[str, type[Warning], str], ...] = (
    # the PRV accountant takes logs of zero on purpose at the edges of its grid
    ("divide by zero encountered in log", RuntimeWarning, "opacus.accountants.analysis.prv.prvs"),
    ("invalid value encountered", RuntimeWarning, "opacus.accountants.analysis.prv.prvs"),
    # the RDP accountant's advice on its orders: fedrec's accountant settings are not options
    ("Optimal order is the largest alpha", UserWarning, "opacus.accountants.analysis.rdp"),
    # torch, about Opacus's ghost clipping hooks on layers whose inputs need no gradient
    (
        "Full backward hook is firing when gradients are computed with respect to module outputs",
        UserWarning,
        "opacus.utils.fast_gradient_clipping_utils",
    ),
    # secure_mode is off, a documented assumption (docs/privacy.md)
    ("Secure RNG turned off", UserWarning, "opacus.privacy_engine"),
    ("Tip: In future versions of Ray", FutureWarning, "ray._private.worker"),
)
# named loggers and the level below which their records are dropped
LOGGER_LEVELS = {"matplotlib.font_manager": logging.ERROR, "ray": logging.ERROR}
# Flower log records dropped by message: fedrec simulate needs run_simulation (see
# simulations/simulate.py); an actor's normal shutdown
FLOWER_MESSAGES = ("The `run_simulation` function is deprecated", "Manually terminating")


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Install the filters in this process (idempotent)."""
    # transformers' "Loading weights" bar for the packaged, local encoder (before its import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message, category, module in WARNING_FILTERS:
        warnings.filterwarnings(
            "ignore", message=message, category=category, module=module.replace(".", r"\.")
        )
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, DropMessages) for f in flower.filters):
        flower.addFilter(DropMessages(FLOWER_MESSAGES))
    flower.propagate = False  # Flower has its own handler: the root one printed everything twice


def worker_environment() -> dict[str, str]:
    """Environment for Ray's worker processes: the same warning filters, and Flower's log level
    at ERROR there (its warnings in a worker are about the worker's own lifecycle)."""
    filters = [  # PYTHONWARNINGS splits on ',' and ':' (the Ray one is the driver's anyway)
        f"ignore:{message}:{category.__name__}:{module}"
        for message, category, module in WARNING_FILTERS
        if not {":", ","} & set(message)
    ]
    inherited = os.environ.get("PYTHONWARNINGS")
    return {
        "PYTHONWARNINGS": ",".join([*filters, *([inherited] if inherited else [])]),
        "FLWR_LOG_LEVEL": "ERROR",
    }


def show_worker_output(shown: bool) -> None:
    """Whether Ray's workers' stdout and stderr, which Ray forwards to this process's, are
    shown (Ray's own switch, the one its debugger uses). Off while a run's engine is torn
    down: a Ray worker can abort as it exits, in Ray's own lock check ("Mutex corrupt ...
    SIGABRT", about 17 lines), after the run's last round or its stop message."""
    from ray._private import worker

    worker._worker_logs_enabled = shown
