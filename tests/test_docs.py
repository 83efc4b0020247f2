"""The documentation and the command-line help agree with the code: every default they state
is the one the code uses, and the docs stand on their own."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from shared.runs.config import RunConfig, _coerce
from simulations.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
# commands whose every option with a default must show it in --help
COMMANDS = (["train"], ["simulate"], ["serve"], ["data", "convert"], ["data", "split"])
# run settings whose empty default means "derived": the help says from what
DERIVED = {"delta": "1/(10 x customers", "data": "the embedded synthetic marketplace"}


def kebab(name: str) -> str:
    return name.replace("_", "-")


def documented_settings() -> dict[str, str]:
    """setting -> default, from the table of docs/configuration.md."""
    settings = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z0-9-]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(",")]
        if len(defaults) != len(names):
            defaults = [cells[1].strip("`")] * len(names)
        settings.update(zip(names, defaults, strict=True))
    return settings


def test_configuration_doc_lists_every_setting_with_its_default() -> None:
    documented = documented_settings()
    assert set(documented) == {kebab(f.name) for f in fields(RunConfig)}
    defaults = RunConfig()
    for field in fields(RunConfig):
        text = documented[kebab(field.name)].replace('""', "")
        expected = getattr(defaults, field.name)
        assert _coerce(text, type(expected), field.name) == expected, field.name


def parser_of(command: list[str]) -> argparse.ArgumentParser:
    parser = build_parser(command)
    for name in command:
        parser = next(
            a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        ).choices[name]
    return parser


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_every_default_and_it_is_the_codes(command: list[str]) -> None:
    parser = parser_of(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.required or action.dest in ("help", "version"):
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._AppendAction):
            continue  # a flag is off, a repeated option empty, unless given
        shown = formatter._expand_help(action)
        stated = re.findall(r"\(default: ([^)]*)\)", shown)
        assert stated, f"{action.option_strings}: no default in {shown!r}"
        setting = getattr(RunConfig, action.dest, None)
        if action.default is not None:
            assert stated[-1] == str(action.default), action.option_strings
        elif action.dest in DERIVED:
            assert stated[-1].startswith(DERIVED[action.dest]), action.option_strings
        elif setting is not None and not isinstance(setting, bool):
            # a run setting: None means RunConfig's default, which the help must state
            assert stated[-1] == str(setting), action.option_strings


def test_help_of_serve_shows_its_limits(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--max-k", 100), ("--max-history", 200), ("--max-body-bytes", 65536)):
        assert re.search(re.escape(option) + r" \w+ .*?\(default: " + str(default) + r"\)", text)


def test_readme_quick_start_states_the_default_federation() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"a federation of (\d+) nodes on the embedded synthetic marketplace,\s+"
        r"up to (\d+) rounds",
        readme,
    )
    assert match, "the quick start no longer states the default federation"
    assert (int(match[1]), int(match[2])) == (RunConfig.clients, RunConfig.rounds)
    match = re.search(
        r"It runs the embedded default \(synthetic marketplace, up to (\d+) rounds\)", readme
    )
    assert match and int(match[1]) == RunConfig.rounds
    assert "`runs/flwr-default`" in readme and RunConfig.out == "runs/flwr-default"


def test_docs_and_help_stand_on_their_own() -> None:
    """No reference to documents outside the repository; every linked doc exists."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for path, text in texts.items():
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    for command in COMMANDS:
        for action in parser_of(command)._actions:
            assert "CONTRACT" not in (action.help or ""), action.option_strings
    assert "docs/data-and-evaluation.md" in texts[ROOT / "README.md"]


PACKAGES = ("server", "client", "shared", "simulations")


def test_architecture_names_every_module() -> None:
    """docs/architecture.md's map of the house names every module of the four folders."""
    house = re.search(r"```\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S)
    assert house, "docs/architecture.md has no map of the house"
    words = set(re.findall(r"\w+", house[1]))
    modules = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    unnamed = [str(p.relative_to(ROOT)) for p in modules if p.stem not in words | {"__init__"}]
    assert not unnamed
