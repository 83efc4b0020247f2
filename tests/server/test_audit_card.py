"""The audit holds the model card (OUT/model/README.md) to metrics.json's privacy statement
(server/privacy/audit_card.py): an operator who edits the card alone fails it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.privacy.audit_card import audit_model_card
from shared.recommender.artifacts import model_card

PRIVACY = {
    "statement": "(8.000, 4.5e-05)-DP for one customer's whole history",
    "epsilon": 7.9999,
    "delta": 4.5e-05,
    "unit": "customer",
}


def write_run(out: Path, privacy: dict | None) -> tuple[Path, Path]:
    """A run's metrics.json and the card the run writes beside it, from the same dict."""
    metrics = {"test": {"ndcg@10": 0.05}, **({"privacy": privacy} if privacy else {})}
    (out / "metrics.json").write_text(json.dumps(metrics))
    card = out / "README.md"
    card.write_text(model_card(title="t", data={}, metrics=metrics, config={}, privacy=privacy))
    return card, out / "metrics.json"


def card_check(card: Path, metrics: Path) -> dict:
    report: dict = {"checks": []}
    audit_model_card(report, card, metrics)
    [found] = report["checks"]
    return found


@pytest.mark.parametrize("privacy", [PRIVACY, None], ids=["dp", "no-dp"])
def test_the_card_a_run_writes_passes(tmp_path, privacy) -> None:
    assert card_check(*write_run(tmp_path, privacy))["status"] == "pass"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t: t.replace('"epsilon": 7.9999', '"epsilon": 1.9999'), "epsilon 1.9999"),
        (lambda t: t.replace('"delta": 4.5e-05', '"delta": 1e-12'), "delta 1e-12"),
        (lambda t: t.replace("(8.000, 4.5e-05)-DP for", "(1.000, 4.5e-05)-DP for", 1), "sentence"),
        (lambda t: t.replace("```json", "```text", 1), "0 JSON blocks"),
        (lambda t: t.replace("## Privacy", "## Notes"), "no '## Privacy' section"),
    ],
    ids=["epsilon", "delta", "sentence", "no-block", "no-section"],
)
def test_a_card_edited_alone_fails(tmp_path, edit, words) -> None:
    card, metrics = write_run(tmp_path, PRIVACY)
    card.write_text(edit(card.read_text()))
    found = card_check(card, metrics)
    assert found["status"] == "fail" and words in found["problems"][0]


def test_a_card_claiming_a_guarantee_a_run_without_dp_never_had_fails(tmp_path) -> None:
    (tmp_path / "private").mkdir()
    private_card, _ = write_run(tmp_path / "private", PRIVACY)
    card, metrics = write_run(tmp_path, None)
    card.write_text(private_card.read_text())
    found = card_check(card, metrics)
    assert found["status"] == "fail" and "metrics.json does not" in found["problems"][0]
