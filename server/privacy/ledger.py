"""The privacy ledger ``OUT/ledger.jsonl``: an append-only, hash-chained log.

Each line is one JSON object with ``seq`` (0, 1, 2, ...), ``kind``, ``time`` (unix seconds),
``prev_hash`` (the previous entry's ``hash``, ``"0" * 64`` for the first) and ``hash``: the sha256
hex digest of the entry's canonical JSON (sorted keys, no spaces) without its ``hash`` field.
Lines are appended, flushed and fsynced as events happen and never rewritten (the file is its
owner's only, 0600); a resumed run reopens the file, checks the chain and continues it. A line
torn by a crash mid-append is removed by ``fedrec ledger repair OUT``
(server/privacy/ledger_repair.py).

The chain makes edits, removals, insertions and reorderings inside the file detectable. It is
not a signature: it cannot tell a cut-off tail, or entries appended at the end by someone
else, from a genuine ledger. Record the head hash (``fedrec audit`` prints it) somewhere else to
pin the end. A run's checkpoint pins the entry written last before it (:func:`ledger_head`):
a resumed run refuses a ledger cut or replaced since (:func:`unpinned`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import time
from pathlib import Path
from typing import Any

from shared.federation.signing import canonical_json  # also importable from here, as before
from shared.runs.durable import fsync_dir

GENESIS = "0" * 64
RESERVED = ("seq", "kind", "time", "prev_hash", "hash")

# The fields each kind of entry must carry, besides the reserved ones.
REQUIRED: dict[str, tuple[str, ...]] = {
    "run_start": ("config", "unit"),
    "contribution": (
        "round",
        "node",
        "contribution_index",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "max_grad_norm",
        "delta",
        "epsilon",
        "accountant",
        "unit",
        "target_epsilon",
        "num_customers",
    ),
    "declined": ("round", "node", "reason"),
    "refused": ("round", "node", "reason"),
    # a report the server refused (malformed, outside the run's plan, or not verifying): what
    # it claims spent (its epsilon, its release as sent), never recomputed
    "unverified": ("round", "node", "reason"),
    # a private request the node never answered (no reply, or an error): it may have spent, so
    # it counts as spent until the node's next contribution shows whether it did
    # (server/privacy/ledger_gaps.py)
    "unanswered": ("round", "node", "reason"),
    # written before a private request leaves (the nodes it goes to: their names, and the
    # Flower ids of those not yet heard from), and closed by ``answered`` once its replies are
    # recorded: one never closed counts as spent (server/privacy/ledger_gaps.py)
    "requested": ("round", "nodes", "unnamed"),
    "answered": ("round",),
    # written by each later start of the run's server (a resume) before its first private
    # request: the entries after it are of the next server start, which the nodes sign
    # (``server_start``; server/privacy/ledger_gaps.py, :func:`server_starts`)
    "resumed": (),
    "node_level": (
        "round",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clipping_norm",
        "delta",
        "epsilon",
        "accountant",
        "unit",
    ),
    "run_end": ("rounds_completed", "reason"),
}


REPAIR_HINT = (
    "if the run crashed while appending it, `fedrec ledger repair {out}` removes that torn "
    "last line (and keeps a backup)"
)


class LedgerError(ValueError):
    """A ledger that cannot be read, or a chain that must not be extended."""


def entry_hash(entry: dict) -> str:
    """sha256 hex of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def missing_fields(entry: dict) -> list[str]:
    """The fields ``entry`` lacks for its kind (an unknown kind lacks ``kind``)."""
    if not isinstance(entry.get("kind"), str) or entry["kind"] not in REQUIRED:
        return ["kind"]
    return [f for f in RESERVED + REQUIRED[entry["kind"]] if f not in entry]


def json_object(text: str | bytes) -> dict:
    """The JSON object ``text`` holds (bytes: UTF-8); ValueError saying why it holds none: not
    UTF-8, not valid JSON, nested or a number too long to parse, or not an object. For files a
    tampered run could hold (ledger lines, receipts, metrics.json): none of it may crash."""
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # a 5000-digit number, 10^5 nested lists
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def is_number(x: Any) -> bool:
    """Whether ``x`` is a finite number a float holds (a bool is not): what a numeric field of
    a tampered file may be checked with (an integer of 400 digits is valid JSON, and no float)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond any float
        return False


def read_ledger(path: str | Path) -> list[dict]:
    """All entries of a ledger file, in file order; a line that is not a JSON object raises
    :class:`LedgerError` naming its 1-based line number (and, for the last line, the repair)."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":  # the end of the last line
        lines.pop()
    entries = []
    for number, line in enumerate(lines, start=1):
        tail = f"; {REPAIR_HINT.format(out=path.parent)}" if number == len(lines) else ""
        try:
            entries.append(json_object(line))
        except ValueError as error:
            raise LedgerError(
                f"{path}, line {number}: {error}; a torn write or a manual edit{tail}"
            ) from None
    return entries


def _hash_matches(entry: dict) -> bool:
    try:
        return entry_hash(entry) == entry.get("hash")
    except ValueError:  # NaN or infinity: never written by PrivacyLedger
        return False


def _follows(prev: dict | None, entry: dict) -> bool:
    """Whether ``entry`` is the chain's direct successor of ``prev`` (None: the start)."""
    if prev is None:
        return entry.get("seq") == 0 and entry.get("prev_hash") == GENESIS
    seq, prev_seq = entry.get("seq"), prev.get("seq")
    return (
        isinstance(seq, int)
        and isinstance(prev_seq, int)
        and seq == prev_seq + 1
        and entry.get("prev_hash") == prev.get("hash")
    )


def verify_chain(entries: list[dict]) -> list[str]:
    """Problems with the hash chain, each naming the 1-based line and what most likely happened.

    An empty list means every entry's hash matches its content and each entry follows the one
    before it (seq + 1, prev_hash = its hash), starting from seq 0 and the genesis hash.
    """
    edited = {n for n, e in enumerate(entries, start=1) if not _hash_matches(e)}
    problems = [f"line {n}: content edited (hash mismatch)" for n in sorted(edited)]
    work, lines = list(entries), list(range(1, len(entries) + 1))  # lines[i]: file line of work[i]
    i = 0
    while i < len(work):
        prev = work[i - 1] if i else None
        hash_linked = work[i].get("prev_hash") == (GENESIS if prev is None else prev.get("hash"))
        # An edited line's seq may be what was edited: its hash link alone decides.
        if (
            _follows(prev, work[i])
            or hash_linked
            and (lines[i] in edited or (i and lines[i - 1] in edited))
        ):
            i += 1
            continue
        # Two lines swapped: another line belongs here, and this one fits where that one was.
        swapped = False
        for j in range(i + 1, len(work)):
            if not _follows(prev, work[j]):
                continue
            trial = work[:i] + [work[j]] + work[i + 1 : j] + [work[i]] + work[j + 1 :]
            spots = [k for k in (i + 1, j, j + 1) if k < len(trial)]
            if all(_follows(trial[k - 1], trial[k]) for k in spots):
                problems.append(f"lines {lines[i]} and {lines[j]} swapped")
                work, swapped = trial, True
                lines[i], lines[j] = lines[j], lines[i]
                break
        if swapped:
            i += 1
            continue
        # An inserted line: the chain runs past it.
        if i + 1 < len(work) and _follows(prev, work[i + 1]):
            start = "the start" if prev is None else f"line {lines[i - 1]}"
            problems.append(
                f"line {lines[i]}: inserted (line {lines[i + 1]} continues the chain from {start})"
            )
            del work[i], lines[i]
            continue
        if i >= 2 and _follows(work[i - 2], work[i]):
            problems.append(
                f"line {lines[i - 1]}: inserted (line {lines[i]} continues the "
                f"chain from line {lines[i - 2]})"
            )
            del work[i - 1], lines[i - 1]
            continue
        seq = work[i].get("seq")
        prev_seq = -1 if prev is None else prev.get("seq")
        if not isinstance(seq, int) or not isinstance(prev_seq, int):
            problems.append(f"line {lines[i]}: seq is missing or not an integer")
        elif seq > prev_seq + 1:
            gone = seq - prev_seq - 1
            what = "1 entry was" if gone == 1 else f"{gone} entries were"
            after = "the start" if prev is None else str(prev_seq)
            problems.append(f"line {lines[i]}: seq {seq} follows {after}: {what} removed before it")
        elif seq == prev_seq + 1:
            before = "the genesis hash" if prev is None else f"line {lines[i - 1]}'s hash"
            problems.append(
                f"line {lines[i]}: prev_hash does not match {before}: the line "
                "before it was replaced, or edited and re-hashed"
            )
        else:
            problems.append(
                f"line {lines[i]}: seq {seq} follows {prev_seq}: entries duplicated or reordered"
            )
        i += 1
    return problems


def ledger_head(entries: list[dict]) -> dict:
    """What a checkpoint pins of the ledger: the ``seq`` and ``hash`` of its last entry."""
    return {"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}


def unpinned(path: Path, head: dict | None) -> str | None:
    """Why the ledger at ``path`` does not hold the entry a checkpoint pinned (``head``, from
    :func:`ledger_head`), None when it does: a ledger removed, replaced or cut since that
    round would under-report what the rounds before it spent. No pin at all (every saved
    round writes one, so the file was edited) and a pin that is no entry's ``seq`` and
    ``hash`` are named too, never a crash."""
    if head is None:
        return "it pins no ledger entry: written before checkpoints pinned one, or edited"
    seq = head.get("seq") if isinstance(head, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(head.get("hash"), str):
        return f"its ledger pin {reprlib.repr(head)} is no entry's seq and hash"
    if not path.exists():
        return f"{path} is missing"
    entries = read_ledger(path)
    if not 0 <= seq < len(entries):
        return f"{path} ends at entry {len(entries) - 1}, before entry {seq}"
    if entries[seq].get("hash") != head.get("hash"):
        return f"{path}: entry {seq} is not the one pinned"
    return None


class PrivacyLedger:
    """An append-only privacy ledger file; opening an existing one verifies and continues it.

    Single writer: only the server process appends. Example::

        ledger = PrivacyLedger(out / "ledger.jsonl")
        ledger.append("contribution", round=3, node="7", contribution_index=2, ...)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict] = []
        if self.path.exists():
            self.entries = read_ledger(self.path)
            if not self.path.read_bytes().endswith(b"\n") and self.entries:
                raise LedgerError(
                    f"{self.path}: the last line has no end (a torn append); "
                    + REPAIR_HINT.format(out=self.path.parent)
                )
            problems = verify_chain(self.entries)
            if problems:
                raise LedgerError(
                    f"{self.path}: refusing to append to a broken chain: " + "; ".join(problems)
                )

    def append(self, kind: str, **fields: Any) -> dict:
        """Write one entry (adds seq, time, prev_hash, hash), flush and fsync it; returns it."""
        if kind not in REQUIRED:
            raise ValueError(f"unknown ledger entry kind {kind!r}; known: {', '.join(REQUIRED)}")
        clash = [f for f in RESERVED if f in fields]
        if clash:
            raise ValueError(f"the ledger sets {', '.join(clash)} itself")
        entry: dict[str, Any] = {
            "seq": len(self.entries),
            "kind": kind,
            "time": time.time(),
            "prev_hash": self.entries[-1]["hash"] if self.entries else GENESIS,
            **fields,
        }
        lacking = missing_fields({**entry, "hash": ""})
        if lacking:
            raise ValueError(f"a {kind} entry needs {', '.join(lacking)}")
        entry["hash"] = entry_hash(entry)
        line = canonical_json(entry) + "\n"
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(descriptor, 0o600)  # the owner's only, whatever the umask
        with os.fdopen(descriptor, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path.parent)
        self.entries.append(entry)
        return entry
