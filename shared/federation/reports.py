"""The privacy report a node sends with each reply, as a typed message both sides share.

The node builds it (client/client_app.py), the server parses every reply's report with
:func:`parse_report` before anything else touches it (a hostile or malformed one is rejected
with a :class:`ReportError` naming the field, never a crash), the ledger stores a
:class:`Release` as a ``contribution`` entry, and the audit reads it back.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.federation.signing import OPTIONAL_FIELDS, SERVER_START, SIGNED_FIELDS
from shared.runs.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

PURPOSES = ("training", "encoder", "evaluation", "guard")
MECHANISMS = ("poisson_subsampled_gaussian", "gaussian")
MAX_TEXT = 4096  # characters in any text field of a report
# the unit of privacy of every release: one Opacus sample is one customer's whole history at a
# node (what the audit recomputes for; a release stating another unit fails it)
PRIVACY_UNIT = "one customer's entire history at this node (every event of one customer)"
# the accountants a release may state: Opacus PRV (fedrec's nodes), PLD (the audit's own)
RELEASE_ACCOUNTANTS = ("prv", "pld")
MAX_SERVER_START = 100_000  # the most starts (the first, and resumes) a run's server numbers


class ReportError(ValueError):
    """A report that cannot be used; the message names the field and what is wrong."""


@dataclass(frozen=True)
class Release:
    """One DP release of a node (a training update or a private evaluation), exactly the
    fields the node signs (:data:`shared.federation.signing.SIGNED_FIELDS`, and
    ``exclusive_customers``, what the node vouches for its customers, and ``server_start``,
    the server start that asked for it: None from a node that states nothing, one of before
    2026-12-07, or from a server that numbers no starts)."""

    run_id: str
    round: int
    node: str
    purpose: str
    contribution_index: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float
    accountant: str
    unit: str
    target_epsilon: float
    num_customers: int
    update_digest: str
    exclusive_customers: bool | None = None
    server_start: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The signed fields, as the node signs them (a statement it did not make left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class NodeReport:
    """What a node says about a request: refused (its policy), declined (its budget), a signed
    release under DP, or nothing to account (no DP)."""

    node: str
    refused: bool = False
    declined: bool = False
    reason: str = ""
    epsilon: float | None = None  # what a declining node has spent so far
    release: Release | None = None
    signature: str = ""
    key_id: str = ""
    public_key: str = ""

    def signed(self) -> dict[str, Any]:
        """The release with its signature, as the ledger records it."""
        assert self.release is not None
        return {**self.release.as_dict(), "signature": self.signature, "key_id": self.key_id}

    def to_record(self) -> dict[str, Any]:
        """The flat record sent on the wire (a Flower ConfigRecord)."""
        record: dict[str, Any] = {"node": self.node, "refused": self.refused}
        record["declined"] = self.declined
        if self.reason:
            record["reason"] = self.reason
        if self.epsilon is not None:
            record["epsilon"] = self.epsilon
        if self.release is not None:
            record.update(self.signed(), public_key=self.public_key)
        return record


_DECISION = {"node", "refused", "declined", "reason", "epsilon"}
_SIGNATURE = {"signature", "key_id", "public_key"}
_TYPES = {f.name: f.type for f in fields(Release) if f.name in SIGNED_FIELDS}
assert tuple(f.name for f in fields(Release)) == SIGNED_FIELDS + OPTIONAL_FIELDS, (
    "Release must carry exactly the signed fields"
)


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ReportError(f"{key}: expected text of at most {MAX_TEXT} characters")
    return value


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is one finite number >= 0 (a bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _number(record: dict, key: str, kind: str) -> Any:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{key}: expected a number, got {type(value).__name__}")
    number = _finite(value)
    if kind == "int":
        if number is None or not number.is_integer():
            raise ReportError(f"{key}: expected a non-negative integer, got {value!r}"[:200])
        return int(value)
    if number is None:
        raise ReportError(f"{key}: expected a finite number >= 0, got {value!r}"[:200])
    return number


def release_value_problem(values: Mapping[str, Any]) -> str | None:
    """What a release (a parsed one's fields, or a ledger entry's, of any JSON types) states
    that no accountant recomputes honestly (None: nothing): a unit other than the customer
    level, an accountant the audit does not know, a noise multiplier outside [MIN, MAX]
    (shared/runs/config.py), a sample rate outside (0, 1] (at 0 a DP-SGD release recomputes
    to a spend of 0), a delta outside (0, 1), no whole number of steps of at least one (none
    spends nothing, yet claims its round), or an epsilon that is no finite number >= 0. The
    server refuses such a release on arrival (server/federation/release_bounds.py), the
    audit's ``releases`` check fails it."""
    unit, accountant, steps = values["unit"], values["accountant"], values["steps"]
    if unit != PRIVACY_UNIT:
        return f"unit {reprlib.repr(unit)}, not the customer level {PRIVACY_UNIT!r}"
    if accountant not in RELEASE_ACCOUNTANTS:
        return f"accountant {reprlib.repr(accountant)}, not {' or '.join(RELEASE_ACCOUNTANTS)}"
    noise, rate, delta = (_finite(values[k]) for k in ("noise_multiplier", "sample_rate", "delta"))
    if noise is None or not MIN_NOISE_MULTIPLIER <= noise <= MAX_NOISE_MULTIPLIER:
        return (
            f"noise_multiplier {reprlib.repr(values['noise_multiplier'])} is outside "
            f"[{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]"
        )
    if rate is None or not 0 < rate <= 1:
        return f"sample_rate {reprlib.repr(values['sample_rate'])} is outside (0, 1]"
    if delta is None or not 0 < delta < 1:
        return f"delta {reprlib.repr(values['delta'])} is outside (0, 1)"
    if isinstance(steps, bool) or not isinstance(steps, int):
        return f"steps {reprlib.repr(steps)} is not a whole number"
    if steps < 1:
        return f"{steps} steps: a release that spends nothing, yet claims its round"
    if _finite(values["epsilon"]) is None:
        return f"epsilon {reprlib.repr(values['epsilon'])} is no finite number >= 0"
    return None


def server_start_problem(value: Any) -> str | None:
    """Why ``value`` is not a server start (None: it is one): a whole number from 1 to
    :data:`MAX_SERVER_START` (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SERVER_START:
        return f"expected a whole number from 1 to {MAX_SERVER_START}, got {reprlib.repr(value)}"
    return None


def claimed_epsilon(record: dict[str, Any]) -> float | None:
    """The epsilon a report states, if it is one finite number >= 0, however malformed the
    rest (what a refused report claims spent is still recorded)."""
    return _finite(record.get("epsilon"))


def parse_report(record: dict[str, Any]) -> NodeReport:
    """The report in a reply's ``privacy`` record, every field whitelisted and type-checked."""
    unknown = set(record) - _DECISION - _SIGNATURE - set(SIGNED_FIELDS) - set(OPTIONAL_FIELDS)
    if unknown:
        raise ReportError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    node = _text(record, "node")
    refused, declined = record.get("refused", False), record.get("declined", False)
    if not isinstance(refused, bool) or not isinstance(declined, bool):
        raise ReportError("refused and declined must be true or false")
    if refused or declined:
        epsilon = _number(record, "epsilon", "float") if "epsilon" in record else None
        return NodeReport(node, refused, declined, _text(record, "reason"), epsilon)
    if "mechanism" not in record:
        return NodeReport(node)  # no DP: nothing spent
    values = {
        key: _text(record, key) if kind == "str" else _number(record, key, kind)
        for key, kind in _TYPES.items()
    }
    exclusive = record.get("exclusive_customers")
    if exclusive is not None and not isinstance(exclusive, bool):
        raise ReportError("exclusive_customers must be true or false")
    start = record.get(SERVER_START)
    if start is not None and server_start_problem(start):
        raise ReportError(f"{SERVER_START}: {server_start_problem(start)}")
    release = Release(**values, exclusive_customers=exclusive, server_start=start)
    if release.purpose not in PURPOSES:
        raise ReportError(f"purpose: expected one of {PURPOSES}, got {release.purpose!r}")
    if release.mechanism not in MECHANISMS:
        raise ReportError(f"mechanism: expected one of {MECHANISMS}, got {release.mechanism!r}")
    if release.node != node:
        raise ReportError(f"node: the release names {release.node!r}, the report {node!r}")
    return NodeReport(
        node,
        release=release,
        signature=_text(record, "signature"),
        key_id=_text(record, "key_id"),
        public_key=_text(record, "public_key"),
    )
