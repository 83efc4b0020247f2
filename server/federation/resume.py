"""Whether a stopped run may be resumed from what its OUT holds: the privacy ledger must still
hold the entries the checkpoint and the encoder rounds' file were pinned to, and the
checkpoint's weights and progress must be this model's."""

from __future__ import annotations

import reprlib
from pathlib import Path

from server.federation.encoder_rounds import encoder_pin
from server.federation.strategy import MAX_CUSTOMERS
from server.privacy.ledger import unpinned
from shared.runs.checkpoint import Checkpoint, non_finite


def require_ledger(out: Path) -> None:
    """Refuse (SystemExit) to resume the checkpoint or the encoder rounds' file in ``out``
    when the ledger no longer holds the last entry written before it (removed, cut or
    replaced since): the rounds before it would be resumed with their spending gone from the
    ledger, and node-level DP would spend it again."""
    out = Path(out)
    try:
        encoder = encoder_pin(out)
    except ValueError as error:  # unreadable, or no pin: the rounds' spending cannot be checked
        raise SystemExit(f"fedrec: {error}; restore it, or start over with another --out") from None
    saved = [] if encoder is None else [encoder]
    if (progress := Checkpoint(out / "checkpoint.safetensors").progress()) is not None:
        if not isinstance(progress, dict):
            raise SystemExit(
                f"fedrec: {out / 'checkpoint.safetensors'}: its progress is not a JSON object; "
                "restore it, or start over with another --out"
            )
        done = reprlib.repr(progress.get("round"))
        saved.append((f"a checkpoint after round {done}", progress.get("ledger")))
    for what, pin in saved:
        if problem := unpinned(out / "ledger.jsonl", pin):
            raise SystemExit(
                f"fedrec: {out} holds {what} but not its privacy ledger ({problem}): "
                "resuming would under-report what was spent; restore the ledger, or start "
                "over with another --out"
            )


def resume_problem(state: dict, progress: dict, expected: dict, num_items: int) -> str | None:
    """Why a checkpoint's weights or progress cannot be resumed by this run's model (edited or
    another model's: ``expected`` is its trainable state), None when they can."""
    if state.keys() != expected.keys():
        return f"its weights are not this model's ({sorted(state.keys() ^ expected.keys())[:3]})"
    if shapes := [k for k in expected if state[k].shape != expected[k].shape]:
        return f"its weights have other shapes than this model's ({shapes[:3]})"
    if bad := non_finite(state):
        return f"its weights hold NaN or infinity ({bad[:3]})"
    rows, done = progress.get("trained_rows"), progress.get("round")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        return f"its round is {str(done)[:20]!r}"
    if not isinstance(progress.get("history"), list):
        return "its history is not a list"
    if not isinstance(rows, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < num_items for r in rows
    ):
        return f"its trained_rows are not rows of the catalog's {num_items} products"
    if not _counts_fit(progress.get("counts", {}), num_items):
        return f"its counts are not item counts of the catalog's {num_items} products"
    return None


def _counts_fit(stored: object, num_items: int) -> bool:
    """Whether a checkpoint's ``counts`` (server/federation/popularity.py) are, per node,
    products of the catalog and as many counts, each in [0, :data:`MAX_CUSTOMERS`] as a
    node's reply is held to (larger ones overflowed the counts' int64, or their sum)."""

    def whole(value: object, below: float) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < below

    return isinstance(stored, dict) and all(
        isinstance(held, list)
        and len(held) == 2
        and all(isinstance(part, list) for part in held)
        and len(held[0]) == len(held[1])
        and all(whole(item, num_items) for item in held[0])
        and all(whole(count, MAX_CUSTOMERS + 1) for count in held[1])
        for held in stored.values()
    )
