"""The audit's check of the model card (``OUT/model/README.md``) against metrics.json, and of
metrics.json's settings against the ledger's.

The card is what a reader of the served model sees: it prints the run's privacy statement and,
under it, metrics.json's ``privacy`` block as JSON, then the run's settings under ``## Training
configuration`` (``shared.recommender.artifacts.model_card``, written from the same dicts in the
same step). The metrics check holds metrics.json's statement to the ledger; this one holds the
card to metrics.json (an edited card, a smaller epsilon, another delta, a guarantee a run
without DP never had, ``dp: true`` or another noise, clip or target in its settings, fails),
and metrics.json's ``config`` to the settings the run's start wrote into the ledger
(``run_start``), which the nodes' signed releases name by its hash: the card's settings were
not checked until 2026-12-08, so editing them, in the card and metrics.json alike, passed."""

from __future__ import annotations

import json
import re
from itertools import zip_longest
from pathlib import Path
from typing import Any

from server.privacy.audit_checks import check
from server.privacy.ledger import json_object
from shared.recommender.artifacts import model_card
from shared.runs.outputs import PATHS, differences

PRIVACY_HEADING = "\n## Privacy\n"
SETTINGS_HEADING = "\n## Training configuration\n"
JSON_BLOCK = re.compile(r"```json\n(.*?)\n```", re.S)
DATA_HEADING, QUALITY_HEADING = "\n## Data\n", "\n## Quality"
# in the card's free text (title, data lines): HTML (a comment hides what follows), code, a heading
UNSAFE = re.compile(r"[<>`#]")


def audit_model_card(report: dict, card: Path, metrics: Path) -> None:
    """Add the ``model_card`` check: the card's privacy section states metrics.json's
    ``privacy`` exactly, its sentence and its JSON block (none when metrics.json has none),
    its training configuration is metrics.json's ``config``, and that is the settings of the
    ledger's run_start (``report["config"]``, where the audit read one)."""
    try:
        text = card.read_text(encoding="utf-8")
        written = json_object(metrics.read_bytes())
    except FileNotFoundError:
        problems = [
            f"{card}: no {metrics.name} beside it (a run writes it before the card): what the "
            "card states is held to nothing"
        ]
    except (OSError, ValueError) as error:
        problems = [f"{card}: {error}"]
    else:
        config = written.get("config")
        shown = card_problems(text, written.get("privacy")) + settings_problems(text, config)
        problems = [
            *(f"{card}: {p}" for p in shown or whole_card_problems(text, written)),
            *(f"{metrics}: {p}" for p in ledger_settings_problems(config, report)),
        ]
    report["checks"].append(
        check(
            "model_card",
            "the model card states metrics.json's privacy and the ledger's settings",
            problems,
            "the model card's privacy section and training configuration are metrics.json's, "
            "word for word, and its settings the ledger's run_start",
        )
    )


def card_problems(text: str, privacy: object) -> list[str]:
    """What the card's privacy section says that metrics.json's ``privacy`` does not."""
    section = _section(text, PRIVACY_HEADING)
    if section is None:
        return ["no '## Privacy' section"]
    if privacy is None:
        claims = JSON_BLOCK.search(section)
        return ["it states a privacy guarantee metrics.json does not"] if claims else []
    stated, problem = _one_block(section, "its privacy section")
    if problem:
        return [problem]
    if stated != privacy:
        return [
            "its privacy JSON differs from metrics.json's (epsilon "
            f"{_field(stated, 'epsilon')} and delta {_field(stated, 'delta')} on the card, "
            f"{_field(privacy, 'epsilon')} and {_field(privacy, 'delta')} in metrics.json)"
        ]
    statement = privacy.get("statement") if isinstance(privacy, dict) else None
    if isinstance(statement, str) and statement not in JSON_BLOCK.sub("", section):
        return ["its privacy sentence is not metrics.json's statement"]
    return []


def whole_card_problems(text: str, written: dict) -> list[str]:
    """What the card holds beyond the card its run writes from metrics.json (``written``):
    ``model_card`` of metrics.json, with the card's own title and data lines (metrics.json
    does not hold them), must be the card, character for character. The sections alone were
    read until 2026-12-08, the first of each name: the genuine ones hidden in an HTML comment
    (which renders as nothing) and edited ones after them passed."""
    title, lines = _free_text(text)
    if unsafe := next((x for x in (title, *lines) if UNSAFE.search(x) or not x.isprintable()), ""):
        return [
            f"its title or data line {unsafe[:60]!r} holds markup (<, >, `, #) or a control "
            "character, which can hide or fake what follows"
        ]
    data = dict(line[2:].split(": ", 1) for line in lines if ": " in line)
    try:
        expected = model_card(
            title=title,
            data=data,
            metrics=written,
            config=written["config"],
            privacy=written.get("privacy"),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        return [f"metrics.json makes no card (a run's would: {str(error)[:60]}), yet one is here"]
    if text == expected:
        return []
    ours, theirs = text.split("\n"), expected.split("\n")
    line = next(n for n, (a, b) in enumerate(zip_longest(ours, theirs)) if a != b)
    shown = ours[line][:60] if line < len(ours) else "(the end)"
    return [
        f"it is not the card its run writes from metrics.json: line {line + 1} is {shown!r}, "
        "text no run writes (hidden or edited sections, or anything added)"
    ]


def _free_text(text: str) -> tuple[str, list[str]]:
    """The card's title and data lines (``- key: value``), which metrics.json does not hold."""
    lines = text.partition(DATA_HEADING)[2].partition(QUALITY_HEADING)[0].strip("\n")
    return text.split("\n", 1)[0].removeprefix("# "), lines.split("\n")


def _section(text: str, heading: str) -> str | None:
    """The card's section under ``heading``, up to the next one (None: no such section)."""
    if heading not in text:
        return None
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def _one_block(section: str, what: str) -> tuple[Any, str | None]:
    """(the value of ``section``'s one JSON block, None), or (None, the problem) where it
    holds none, several or one that does not parse (``what`` names the section)."""
    blocks = JSON_BLOCK.findall(section)
    if len(blocks) != 1:
        return None, f"{what} holds {len(blocks)} JSON blocks, not one"
    try:
        return json.loads(blocks[0]), None
    except ValueError as error:
        return None, f"{what} does not parse as JSON ({error})"


def _field(block: object, key: str) -> str:
    """``block[key]`` shortened for a message."""
    return str(block.get(key) if isinstance(block, dict) else None)[:40]


def settings_problems(text: str, config: Any) -> list[str]:
    """What the card's ``## Training configuration`` JSON says that metrics.json's ``config``
    does not (the run writes both from the same settings)."""
    section = _section(text, SETTINGS_HEADING)
    if section is None:
        return ["no '## Training configuration' section"]
    stated, problem = _one_block(section, "its training configuration")
    if problem:
        return [problem]
    if not isinstance(config, dict):
        return [f"metrics.json states no settings to hold it to (config {str(config)[:40]!r})"]
    if not isinstance(stated, dict):
        return [f"its training configuration is not a JSON object but {str(stated)[:40]!r}"]
    changed = [_change(key, stated, config) for key in sorted(stated.keys() | config.keys())]
    changed = [c for c in changed if c]
    if changed:
        return [f"its training configuration differs from metrics.json's ({_listed(changed)})"]
    return []


def ledger_settings_problems(config: Any, report: dict) -> list[str]:
    """What metrics.json's ``config`` says that the settings of the ledger's run_start
    (``report["config"]``, less the ``num_nodes`` it adds) do not, as a run started again
    over OUT is held to them (``shared.runs.outputs.differences``: a setting the run's start
    predates matches at its default), a place (data, out) aside: where the run was is no
    claim of its privacy. Nothing where the audit read no run_start (``report["dp"]`` None)."""
    if report.get("dp") is None:
        return []
    if not isinstance(config, dict):
        return [f"it states no settings (config {str(config)[:40]!r}), the ledger's run_start does"]
    started = {key: value for key, value in report["config"].items() if key != "num_nodes"}
    changed = [
        change for change in differences(started, config) if change.split(":", 1)[0] not in PATHS
    ]
    if "delta" in started and started["delta"] != config.get("delta") and config.get("delta") == 0:
        changed.append(f"delta: {started['delta']!r} -> 0")  # differences reads 0 as "derived"
    if changed:
        return [
            f"its config differs from the settings the ledger's run_start recorded "
            f"({_listed(changed)}): not the run the ledger accounts"
        ]
    return []


def _change(key: str, stated: dict, config: dict) -> str | None:
    """``key: metrics.json's -> the card's`` where they differ (None where they agree)."""
    if key in stated and key in config and stated[key] == config[key]:
        return None
    ours, theirs = (str(d.get(key, "(absent)"))[:40] for d in (config, stated))
    return f"{key}: {ours} in metrics.json, {theirs} on the card"


def _listed(changes: list[str]) -> str:
    """The first few ``changes``, and how many more."""
    more = f"; {len(changes) - 5} more" if len(changes) > 5 else ""
    return "; ".join(changes[:5]) + more
