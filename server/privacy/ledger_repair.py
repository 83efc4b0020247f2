"""``fedrec ledger repair OUT``: remove the torn last line a crash mid-append left in
``OUT/ledger.jsonl``, so that the run can resume.

Only the tail is touched: a last line that is not valid JSON, or has no end of line, is
removed, unless it is a complete entry that continues the chain, which is kept and given its
end of line. The original is kept as ``ledger.jsonl.torn-<UTC time>``. Damage anywhere else, or
a chain that does not verify after the repair, is refused: that is not a crash, and the audit
must see it as it is.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from server.privacy.ledger import LedgerError, json_object, verify_chain
from shared.runs.durable import OutputInUse, RunLock, atomic_write, make_private


def _entry(line: bytes) -> dict | None:
    """The JSON object on ``line``, or None when it is not one."""
    try:
        return json_object(line)
    except ValueError:
        return None


def repaired(data: bytes) -> tuple[bytes, str | None]:
    """The ledger ``data`` with its torn last line removed (or its missing end of line added),
    and what was done (None: nothing to repair); LedgerError when the damage is not only at the
    tail or the chain does not verify."""
    lines = data.split(b"\n")
    ended = lines[-1] == b""
    if ended:
        lines.pop()
    entries = [_entry(line) for line in lines]
    for number, entry in enumerate(entries[:-1], start=1):
        if entry is None:
            raise LedgerError(
                f"line {number} of {len(lines)} is not a JSON object: damage inside the ledger, "
                "not a torn append; not repaired"
            )
    last = entries[-1] if entries else None
    complete = [e for e in entries if e is not None]
    if lines and last is None:
        action = f"removed the torn last line {len(lines)} ({len(lines[-1])} bytes)"
    elif not ended:
        action = f"ended the complete last line {len(lines)} (its end of line was missing)"
    else:
        action = None
    if problems := verify_chain(complete):
        raise LedgerError(
            "the chain would not verify after the repair (" + "; ".join(problems) + "): "
            "not a torn append; not repaired"
        )
    if action is None:
        return data, None
    kept = lines[: len(complete)]
    return b"".join(line + b"\n" for line in kept), action


def repair(out: Path) -> str | None:
    """Repair ``out/ledger.jsonl`` in place, the original kept aside; returns what was done
    (None: nothing to repair). Refused while a run holds ``out``."""
    path = Path(out) / "ledger.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger (is {out} a run's output directory?)")
    with RunLock(out):
        data = path.read_bytes()
        fixed, action = repaired(data)
        if action is None:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = path.with_name(f"{path.name}.torn-{stamp}")
        shutil.copy2(path, backup)
        make_private(backup)
        atomic_write(path, fixed)
        return f"{action}; the original is kept as {backup}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="the run's output directory (holds ledger.jsonl)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        done = repair(args.out)
    except (LedgerError, OutputInUse) as error:
        print(f"fedrec: refused: {error}", file=sys.stderr)
        return 1
    print(f"{args.out / 'ledger.jsonl'}: {done or 'nothing to repair: every line is whole'}")
    return 0
