"""What an output directory already holds, so that a command run again over it says what it
does instead of starting over: a finished run with the same settings is left as it is, an
unfinished one resumes, and a run with other settings is refused before anything is written.

A finished run has ``metrics.json``; an unfinished federation has the checkpoint that
``shared.runs.checkpoint.Checkpoint`` writes (its settings in the safetensors metadata), or,
stopped before its first checkpoint (in its encoder rounds, say), the privacy ledger its start
wrote (its settings in the first entry). Without that last, a run started again there with other
settings went on: it continued the ledger of the first start, and asked the nodes for the
first start's budget (``--target-epsilon 2`` over a start of 8 asked for 8's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.safetensors"
LEDGER = "ledger.jsonl"
PATHS = ("data", "out")  # settings that name a place: compared as resolved paths


class OtherSettings(ValueError):
    """The output directory holds a run with other settings."""


def stored_settings(out: Path) -> tuple[dict[str, Any], bool] | None:
    """(settings, finished) of the run in ``out``, or None when it holds none; raises
    :class:`OtherSettings` for outputs whose settings cannot be read."""
    out = Path(out)
    if (out / "metrics.json").exists():
        try:
            settings = json.loads((out / "metrics.json").read_text()).get("config")
        except (json.JSONDecodeError, AttributeError):
            settings = None
        if not isinstance(settings, dict):
            raise OtherSettings(
                f"refused: {out} holds outputs without their settings (metrics.json); "
                "use another --out"
            )
        return settings, True
    from shared.runs.checkpoint import Checkpoint, CheckpointError

    try:
        progress = Checkpoint(out / CHECKPOINT).progress()
    except CheckpointError as error:
        raise OtherSettings(f"refused: {error}") from None
    if progress is not None:
        return progress["config"], False
    started = _ledger_settings(out)
    return None if started is None else (started, False)


def _ledger_settings(out: Path) -> dict[str, Any] | None:
    """The settings of the run that started ``out``'s privacy ledger (its first entry's
    ``config``, less the ``num_nodes`` it adds), None without a ledger or an entry; raises
    :class:`OtherSettings` when the first entry holds no settings."""
    path = out / LEDGER
    if not path.exists():
        return None
    with path.open("rb") as ledger:
        first = ledger.readline()
    if not first.strip():
        return None
    try:
        settings = json.loads(first).get("config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        settings = None
    if not isinstance(settings, dict):
        raise OtherSettings(
            f"refused: {out} holds a privacy ledger whose first entry has no settings "
            f"({LEDGER}); use another --out"
        )
    return {key: value for key, value in settings.items() if key != "num_nodes"}


def differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """The settings in which ``requested`` differs from ``stored``, as ``key: old -> new``.

    A requested ``delta`` of 0 means "derived from the data" and matches the stored one;
    paths compare resolved. A setting the stored run predates (absent from it) matches when
    it is requested at its default: a run stopped before an upgrade that added a setting
    resumes with the new version (a federation reads few of the settings; a private one
    started again elsewhere would spend its nodes' budgets twice).
    """
    from shared.runs.config import RunConfig  # torch, through the model's settings

    defaults = RunConfig().to_dict()
    changed = []
    for key in sorted(stored.keys() | requested.keys()):
        old, new = stored.get(key), requested.get(key)
        if key == "delta" and new == 0:
            continue
        if key not in stored and key in defaults and new == defaults[key]:
            continue
        if key in PATHS and old and new and Path(old).resolve() == Path(new).resolve():
            continue
        if old != new:
            changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


def check_rerun(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds a finished run with these settings (nothing to do), False when
    it holds none or an unfinished one with them; raises :class:`OtherSettings` otherwise."""
    found = stored_settings(out)
    if found is None:
        return False
    stored, finished = found
    changed = differences(stored, settings)
    if changed:
        raise OtherSettings(
            f"refused: {out} holds a run with other settings ({'; '.join(changed)}); "
            "use another --out"
        )
    return finished
