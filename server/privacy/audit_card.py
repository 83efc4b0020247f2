"""The audit's check of the model card (``OUT/model/README.md``) against metrics.json.

The card is what a reader of the served model sees: it prints the run's privacy statement and,
under it, metrics.json's ``privacy`` block as JSON (``shared.recommender.artifacts.model_card``,
written from the same dict in the same step). The metrics check holds metrics.json to the
ledger; this one holds the card to metrics.json, so an edited card (a smaller epsilon, another
delta, a guarantee a run without DP never had) fails the audit."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.privacy.audit_checks import check
from server.privacy.ledger import json_object

PRIVACY_HEADING = "\n## Privacy\n"
JSON_BLOCK = re.compile(r"```json\n(.*?)\n```", re.S)


def audit_model_card(report: dict, card: Path, metrics: Path) -> None:
    """Add the ``model_card`` check: the card's privacy section states metrics.json's
    ``privacy`` exactly, its sentence and its JSON block (none when metrics.json has none)."""
    try:
        text = card.read_text(encoding="utf-8")
        privacy = json_object(metrics.read_bytes()).get("privacy")
    except (OSError, ValueError) as error:
        problems = [f"{card}: {error}"]
    else:
        problems = [f"{card}: {p}" for p in card_problems(text, privacy)]
    report["checks"].append(
        check(
            "model_card",
            "the model card states metrics.json's privacy",
            problems,
            "the model card's privacy section is metrics.json's, word for word",
        )
    )


def card_problems(text: str, privacy: object) -> list[str]:
    """What the card's privacy section says that metrics.json's ``privacy`` does not."""
    if PRIVACY_HEADING not in text:
        return ["no '## Privacy' section"]
    section = text.split(PRIVACY_HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = JSON_BLOCK.findall(section)
    if privacy is None:
        return ["it states a privacy guarantee metrics.json does not"] if blocks else []
    if len(blocks) != 1:
        return [f"its privacy section holds {len(blocks)} JSON blocks, not metrics.json's one"]
    try:
        stated = json.loads(blocks[0])
    except ValueError as error:
        return [f"its privacy JSON does not parse ({error})"]
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


def _field(block: object, key: str) -> str:
    """``block[key]`` shortened for a message."""
    return str(block.get(key) if isinstance(block, dict) else None)[:40]
