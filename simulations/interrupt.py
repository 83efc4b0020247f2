"""A federation stopped by Ctrl-C (SIGINT) or SIGTERM: the signals ``fedrec simulate`` and
``fedrec deploy local`` stop on, and what they say then. Both resume when run again with the
same command: the ledger holds every reply it was given (written before the reply is used),
and a reply the stop lost is recovered from its node's next one (server/privacy/ledger_gaps.py).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

INTERRUPTED = 130  # the status a shell gives a command stopped by SIGINT (128 + 2)
Handler = Callable[[int, object], None]


def raise_interrupt(signum: int, frame: object) -> None:
    """Stop as Ctrl-C does: a KeyboardInterrupt, which unwinds through the teardown."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals(handler: Handler, signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """``handler`` for ``signals`` for the duration; the previous handlers afterwards."""
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def interrupted(out: Path, stopped: str) -> int:
    """Say on stderr that the run was interrupted (``stopped``: what was stopped), where its
    spending so far is, and the command that resumes it (this one); returns the status, 130."""
    command = shlex.join(["fedrec", *sys.argv[1:]])
    print(
        f"fedrec: interrupted; {stopped}. What was spent so far is in "
        f"{Path(out) / 'ledger.jsonl'} (nothing is lost).\n"
        f"resume with the same command: {command}",
        file=sys.stderr,
        flush=True,
    )
    return INTERRUPTED


def descendants(root: int) -> list[int]:
    """The processes descended from ``root``, children and theirs (none without /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # a process that ended while we looked
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found = []
    for pid, parent in parents.items():
        while parent not in (root, 0, 1) and parent in parents:
            parent = parents[parent]
        if parent == root:
            found.append(pid)
    return found


def stop_descendants(prefix: bytes) -> None:
    """SIGTERM each process descended from this one whose command line starts with
    ``prefix``."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # ended meanwhile
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix):
                os.kill(pid, signal.SIGTERM)
