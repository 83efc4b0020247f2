"""A node's one privacy accountant, for every federation that ever used its data directory.

The state (Opacus's PRV history, the number of releases charged, the node's noise multiplier,
the private answers it gave, which its ``max-answer-share`` bounds: client/policy.py) is
``<data dir>/privacy/accountant.json``. Several processes may charge it at once (two
federations on one SuperNode or one data directory), so every read, check and charge runs under
:meth:`NodePrivacy.locked`: an exclusive ``flock`` (POSIX; the node runs on Linux) on
``privacy/accountant.lock`` that re-reads the state. No charge is lost, no two releases share a
contribution index, and a budget is checked against every charge before it. The state is
written to a temporary file of the writer's own, fsynced and renamed over the old one: a crash
leaves the old state or the new, never part of either. A release is charged before anything
computed under it leaves the node, so a crash can over-count spending, never forget it; a
state that counts fewer releases than the node's receipt log (deleted, or an older copy put
back) is refused.

Within a run a node charges its requests in the order of their server starts and rounds
(:class:`RequestPosition`): it refuses, before spending anything, a request of an earlier
server start, or of the same start and an earlier round, than one it has already charged for
the same run. The ledger's rules for a reply that never arrived depend on that order
(server/privacy/ledger_gaps.py: a later round's release shows whether the earlier request was
charged, and a release to a restarted server whether a killed one's request was); a delayed or
replayed message, or a killed server's request still in the node's hands, cannot break it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.recommender.training import new_accountant, prv_epsilon
from shared.runs.durable import fsync_dir

Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps) of one release


@dataclass(frozen=True)
class RequestPosition:
    """Where a private request stands in its run: the run's id, its phase (0: the encoder's rounds,
    which come first; 1: the model's rounds, whose training, evaluation and start guard share
    their round's number, round 0 being the public start's evaluation), its round and the server
    start that asked (1 at the run's first, one more at each resume; 0: a server that numbers
    none). A node charges requests of one run in this order, the start first, requests of the
    same position in any."""

    run_id: str
    phase: int
    round: int
    start: int = 0

    @property
    def order(self) -> list[int]:
        """(start, phase, round): what is compared within a run."""
        return [self.start, self.phase, self.round]


def charged_order(saved: list[int]) -> list[int]:
    """The position a node's state says it charged last, as :attr:`RequestPosition.order`
    (a state written before server starts were numbered holds (phase, round): start 0)."""
    return [0, *saved] if len(saved) == 2 else list(saved)


class NodePrivacy:
    """The node's accountant, read from its data directory. A release checks and charges it
    in one locked block, which no other process can interleave::

        with privacy.locked():  # waits for another release's block; re-reads the state
            if over_budget(privacy, delta, budget, event) is None:
                epsilon, index = privacy.charge(event, delta)  # saved when it returns
    """

    def __init__(self, directory: Path, position: RequestPosition | None = None):
        self.path = Path(directory) / "privacy" / "accountant.json"
        self.position = position  # the request this object charges for; None: not checked
        self.lock_path = self.path.with_suffix(".lock")
        self._lock: int | None = None  # the lock file's descriptor while this object holds it
        self.state = self._read()

    def _read(self) -> dict:
        """The state; ValueError when it counts fewer releases than the receipt log holds
        (every receipt is of a charged release): deleted or restored from an older copy, it
        would forget spending and let the node spend its budget again. The log is counted
        first: a release charged and logged by another process between the two reads (this
        one outside the lock) is then in neither, never in the log alone."""
        receipts = self.receipts.read_bytes().count(b"\n") if self.receipts.exists() else 0
        state = {"accountant": {}, "contributions": 0, "noise_multiplier": None, "answers": []}
        if self.path.exists():
            state = json.loads(self.path.read_text())
        if state["contributions"] < receipts:
            raise ValueError(
                f"{self.path} counts {state['contributions']} release(s) but the node's receipt "
                f"log {self.receipts} holds {receipts}: the accountant was deleted or restored "
                "from an older copy and would forget spending; restore its latest copy"
            )
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[NodePrivacy]:
        """Hold the node's accountant lock for the block, waiting while another process holds
        it, and re-read the state under it (changes made to ``state`` before are dropped). A
        block nested in one of the same object holds it once; the OS releases it if the
        process dies."""
        if self._lock is not None:
            yield self
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            self._lock = descriptor
            self.state = self._read()
            yield self
        finally:
            self._lock = None
            os.close(descriptor)  # closing releases the lock

    def save(self) -> None:
        """Write the state atomically and durably (under :meth:`locked` where others write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, tmp = tempfile.mkstemp(
            prefix=f"{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)

    @property
    def receipts(self) -> Path:
        """The node's own log of the signed reports it sent (``fedrec audit --receipts``)."""
        return self.path.parent / "receipts.jsonl"

    def epsilon_after(self, delta: float, extra: Event | None = None) -> float:
        """The epsilon at ``delta`` of what the state holds, with ``extra`` if given."""
        accountant = new_accountant(self.state["accountant"] or None)
        if extra is not None:
            accountant.history.append(extra)
        return prv_epsilon(accountant, delta) if accountant.history else 0.0

    def declined(self, delta: float, reason: str) -> dict:
        """A release declined for ``reason``: what the node has spent so far, at ``delta``."""
        epsilon = self.epsilon_after(delta)
        return {"declined": True, "epsilon": epsilon, "delta": delta, "reason": reason}

    def order_refusal(self) -> str | None:
        """Why this request comes too late to be charged: this node already charged a later
        round of the same run (a delayed or replayed message), or a request of a later server
        start (a killed server's request, charged after its restarted server's); None when it
        may be, or when no position was given. Checked under :meth:`locked`, with the budget."""
        if self.position is None:
            return None
        saved = self.state.get("charged_up_to", {}).get(self.position.run_id)
        if saved is None or self.position.order >= charged_order(saved):
            return None
        start, phase, server_round = charged_order(saved)
        reached = f"round {server_round} of its {'model' if phase else 'encoder'} rounds"
        if start > self.position.start:
            reached += f" asked by server start {start}"
            late = f"a request of server start {self.position.start}, round {self.position.round}"
        else:
            late = f"a request of round {self.position.round}"
        return (
            f"{late} comes after this node charged {reached} for the same run: requests are "
            "charged in the order of their server starts and rounds (the ledger counts "
            "unanswered requests by that order), so this one is refused, nothing spent"
        )

    def answers(self, extra: float | None = None) -> tuple[tuple[float, int], ...]:
        """The private answers (evaluations, start-guard comparisons: Gaussian releases of
        sensitivity 1) this node has charged over its lifetime, as (noise multiplier, count),
        with one more at noise ``extra`` if given. A state written before the accountant kept
        them (no ``answers``) counts every single Gaussian release of its history (sample
        rate 1, one step; a DP-SGD step over all the customers among them)."""
        counts: dict[float, int] = {}
        if "answers" in self.state:
            counts = {float(sigma): int(count) for sigma, count in self.state["answers"]}
        else:
            for sigma, rate, steps in self.state["accountant"].get("history", []):
                if rate == 1 and steps == 1:
                    counts[float(sigma)] = counts.get(float(sigma), 0) + 1
        if extra is not None:
            counts[float(extra)] = counts.get(float(extra), 0) + 1
        return tuple(sorted(counts.items()))

    def charge(self, event: Event, delta: float, answer: bool = False) -> tuple[float, int]:
        """Add ``event`` to the accountant (``answer``: also to the node's private answers,
        :meth:`answers`) and save it, under the lock (taken here, and the state re-read,
        unless the caller holds it), before anything computed under it leaves; returns the
        epsilon at ``delta`` and the release's contribution index. Refuses (a ValueError,
        nothing charged) a request that :meth:`order_refusal` turns away."""
        with self.locked():
            if reason := self.order_refusal():
                raise ValueError(reason)
            if answer:
                self.state["answers"] = [list(pair) for pair in self.answers(event[0])]
            accountant = new_accountant(self.state["accountant"] or None)
            accountant.history.append(event)
            self.state["accountant"] = accountant.state_dict()
            self.state["contributions"] += 1
            if self.position is not None:
                charged = self.state.setdefault("charged_up_to", {})
                charged[self.position.run_id] = self.position.order
            self.save()
            index = self.state["contributions"] - 1
        return prv_epsilon(accountant, delta), index
