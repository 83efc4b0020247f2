"""The audit holds the model card (OUT/model/README.md) to metrics.json's privacy statement and
settings, and metrics.json's settings to the ledger's run_start (server/privacy/audit_card.py):
an operator who edits the card alone, or the card and metrics.json together, fails it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.privacy.audit import audit
from server.privacy.audit_card import audit_model_card
from shared.recommender.artifacts import model_card, write_json
from shared.recommender.experiment import EMBEDDED_NAME
from shared.runs.config import RunConfig
from tests.server.test_ledger_audit import write_planned_run

PRIVACY = {
    "statement": "(8.000, 4.5e-05)-DP for one customer's whole history",
    "epsilon": 7.9999,
    "delta": 4.5e-05,
    "unit": "customer",
}


CONFIG = RunConfig(dp=True, target_epsilon=8.0, partition="merchant").to_dict()


def write_run(out: Path, privacy: dict | None, config: dict = CONFIG) -> tuple[Path, Path]:
    """A run's metrics.json and the card the run writes beside it, from the same dicts."""
    metrics = {"test": {"ndcg@10": 0.05}, "config": config}
    metrics |= {"privacy": privacy} if privacy else {}
    (out / "metrics.json").write_text(json.dumps(metrics))
    card = out / "README.md"
    card.write_text(model_card(title="t", data={}, metrics=metrics, config=config, privacy=privacy))
    return card, out / "metrics.json"


def card_check(card: Path, metrics: Path, started: dict | None = None) -> dict:
    """The model_card check, with ``started`` the ledger's run_start settings (None: the
    audit read no run_start)."""
    report: dict = {"checks": [], "dp": None, "config": {}}
    if started is not None:
        report |= {"dp": bool(started.get("dp")), "config": started}
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


def _hide_and_edit(text: str) -> str:
    """The genuine sections inside an HTML comment, which renders as nothing, and edited ones
    after it (epsilon 0.5, target 0.5): the reader sees those (reviewer R, session 43)."""
    head, rest = text.split("\n## Privacy\n", 1)
    shown = "\n## Privacy\n" + rest.replace("7.9999", "0.5").replace("(8.000,", "(0.500,")
    shown = shown.replace('"target_epsilon": 8.0', '"target_epsilon": 0.5')
    return head + "\n<!--\n## Privacy\n" + rest + "\n-->\n" + shown


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_hide_and_edit, "line 14 is '<!--', text no run writes"),
        (
            lambda t: t + "\n## Privacy\n\n(0.500, 4.5e-05)-DP\n",
            "is '## Privacy', text no run writes",
        ),
        (lambda t: t.replace("# t", "# t <!--", 1) + "-->", "line 't <!--' holds markup"),
        (
            lambda t: t.replace("## Data\n", "## Data\n\n- a: ## Privacy: (0.5, 1e-5)-DP", 1),
            "markup",
        ),
        (lambda t: t.replace("## Data\n", "## Data\n\n- a: <details>", 1), "line '- a: <d"),
    ],
    ids=["hidden-sections", "appended", "title-comment", "data-heading", "data-html"],
)
def test_a_card_whose_audited_sections_are_genuine_but_not_all_it_shows_fails(
    tmp_path, edit, words
) -> None:
    """Only the first '## Privacy' and '## Training configuration' sections were read: the
    whole card is now the one ``model_card`` writes from metrics.json, with the card's own
    title and data lines, which may hold no markup."""
    card, metrics = write_run(tmp_path, PRIVACY)
    card.write_text(edit(card.read_text()))
    (problem,) = card_check(card, metrics, {**CONFIG, "num_nodes": 3})["problems"]
    assert problem.startswith(f"{card}: ") and words in problem, problem


def test_a_card_as_the_run_writes_it_passes_whole(tmp_path) -> None:
    """metrics.json by the run's own writer (numpy figures, nested views, no privacy) and
    the card by ``model_card`` from the same dicts: the card regenerated from metrics.json and
    its own title and data lines is the card."""
    test = {"ndcg@10": np.float64(0.05), "users": 7, "cold": {"ndcg@10": 0.0, "users": 0}}
    data = {"dataset": EMBEDDED_NAME, "customers": 5, "products": np.int64(9), "events": 40}
    for privacy in (PRIVACY, None):
        metrics = {"test": test, "config": CONFIG} | ({"privacy": privacy} if privacy else {})
        write_json(tmp_path / "metrics.json", metrics)
        card = tmp_path / "README.md"
        title = "fedrec centralized reference model"
        card.write_text(
            model_card(title=title, data=data, metrics=metrics, config=CONFIG, privacy=privacy)
        )
        assert card_check(card, tmp_path / "metrics.json", CONFIG)["status"] == "pass"


def _set(text: str, key: str, old: object, new: object) -> str:
    """``text`` with the JSON line of ``key`` set from ``old`` to ``new`` (once, exactly)."""
    line = f'"{key}": {json.dumps(old)}'
    assert text.count(line) == 1
    return text.replace(line, f'"{key}": {json.dumps(new)}')


@pytest.mark.parametrize(
    ("key", "new"),
    [("dp", False), ("target_epsilon", 2.0), ("max_grad_norm", 0.1), ("delta", 1e-9)],
)
def test_a_cards_training_configuration_edited_alone_fails(tmp_path, key, new) -> None:
    """The card's settings were never read: an operator could show another target, clip,
    delta or no DP at all under an audited privacy section, and pass."""
    card, metrics = write_run(tmp_path, PRIVACY)
    card.write_text(_set(card.read_text(), key, CONFIG[key], new))
    found = card_check(card, metrics)
    assert found["status"] == "fail"
    assert found["problems"] == [
        f"{card}: its training configuration differs from metrics.json's ({key}: "
        f"{CONFIG[key]} in metrics.json, {new} on the card)"
    ]


def test_settings_edited_in_metrics_json_and_the_card_alike_fail_against_the_ledger(
    tmp_path,
) -> None:
    """Edited in both (a run without DP shown as one, a target of 8 shown as 2), the card
    agrees with metrics.json; the ledger's run_start, which the nodes' signatures name by its
    hash, does not."""
    started = {**CONFIG, "dp": False, "target_epsilon": 8.0, "num_nodes": 5}
    claimed = {**CONFIG, "dp": True, "target_epsilon": 2.0}
    card, metrics = write_run(tmp_path, None, claimed)
    found = card_check(card, metrics, started)
    assert found["status"] == "fail"
    (problem,) = found["problems"]
    assert problem.startswith(f"{metrics}: its config differs from the settings the ledger's")
    assert "dp: False -> True" in problem and "target_epsilon: 8.0 -> 2.0" in problem
    assert card_check(*write_run(tmp_path, None, {**claimed, "delta": 0.0}), started)["problems"], (
        "a delta of 0 in metrics.json, read elsewhere as derived, is a change here"
    )


def test_the_ledgers_settings_pass_with_its_node_count_and_an_older_runs_missing_setting(
    tmp_path,
) -> None:
    """The run_start adds ``num_nodes``; a run started before a setting existed and resumed
    after states it at its default in metrics.json; a place (out) may be spelled otherwise."""
    started = {**CONFIG, "num_nodes": 5, "out": "./run"}
    del started["wire_dtype"]
    card, metrics = write_run(tmp_path, PRIVACY, {**CONFIG, "out": str(Path("run").resolve())})
    assert card_check(card, metrics, started)["status"] == "pass"


def test_a_card_without_its_metrics_json_fails_the_audit(tmp_path) -> None:
    """The audit checked the card only when metrics.json was there: an operator who removed
    metrics.json could edit the card at will (epsilon 8 shown as 2) and pass."""
    out = write_planned_run(tmp_path / "run", {"0": 800, "1": 1000})
    (out / "model").mkdir()
    card, metrics = write_run(out / "model", PRIVACY)
    metrics.unlink()
    card.write_text(card.read_text().replace('"epsilon": 7.9999', '"epsilon": 1.9999'))
    (found,) = [c for c in audit(out)["checks"] if c["name"] == "model_card"]
    assert found["status"] == "fail"
    assert found["problems"] == [
        f"{card}: no metrics.json beside it (a run writes it before the card): what the card "
        "states is held to nothing"
    ]
