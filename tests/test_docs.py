"""The documentation and the command-line help agree with the code: every default they state
is the one the code uses, and the docs stand on their own."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from shared.runs.config import CHOICES, RANGES, RunConfig, _coerce
from simulations.cli import COMMANDS as COMMAND_PATHS
from simulations.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("server", "client", "shared", "simulations")  # the house: docs/architecture.md
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
    texts = {p: p.read_text() for p in DOCS}
    for path, text in texts.items():
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    for command in COMMANDS:
        for action in parser_of(command)._actions:
            assert "CONTRACT" not in (action.help or ""), action.option_strings
    assert "docs/data-and-evaluation.md" in texts[ROOT / "README.md"]


# a path in the repository, optionally with the function or class it names: shared/x.py:name
REFERENCE = re.compile(
    r"(?<![\w/.])((?:server|client|shared|simulations|tests)/[\w/.-]*\w)(?::(\w+))?"
)


def defined_names(path: Path) -> set[str]:
    """The functions, classes and module-level names ``path`` defines."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


# a module, optionally with what it defines: ``shared.data.errors.DataError``
DOTTED = re.compile(r"`((?:server|client|shared|simulations)(?:\.\w+)+)`")


def dotted_problem(reference: str) -> str | None:
    """Why ``a.b.c.Name`` names nothing (None: it names a module, or what one defines, or is
    no module path at all, as ``server.pem``)."""
    parts = reference.split(".")
    top = ROOT / parts[0] / parts[1]
    if not (top.is_dir() or top.with_suffix(".py").exists()):
        return None
    for end in range(len(parts), 0, -1):
        module = ROOT.joinpath(*parts[:end])
        if module.is_dir() and end == len(parts):
            return None
        if module.with_suffix(".py").exists():
            rest = parts[end:]
            if rest and rest[0] not in defined_names(module.with_suffix(".py")):
                return f"{reference}: {'.'.join(parts[:end])} defines no {rest[0]}"
            return None
    return f"{reference}: no such module"


def test_docs_name_only_files_and_functions_that_exist() -> None:
    """Every ``server/...``, ``client/...`` path the docs (and the code's own docstrings and
    comments) name exists, and every ``file.py:name`` or ``package.module.name`` is defined
    there (a moved or renamed function is caught)."""
    sources = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    missing = []
    for doc in DOCS + sources:
        for target, name in REFERENCE.findall(doc.read_text()):
            path = ROOT / target
            if not path.exists():
                missing.append(f"{doc.name}: {target}")
            elif name and path.suffix == ".py" and name not in defined_names(path):
                missing.append(f"{doc.name}: {target}:{name}")
        for reference in DOTTED.findall(doc.read_text()):
            if problem := dotted_problem(reference):
                missing.append(f"{doc.name}: {problem}")
    assert not missing


def test_architecture_names_every_module() -> None:
    """docs/architecture.md's map of the house names every module of the four folders."""
    house = re.search(r"```\n(.*?)```", (ROOT / "docs" / "architecture.md").read_text(), re.S)
    assert house, "docs/architecture.md has no map of the house"
    words = set(re.findall(r"\w+", house[1]))
    modules = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    unnamed = [str(p.relative_to(ROOT)) for p in modules if p.stem not in words | {"__init__"}]
    assert not unnamed


def documented_commands() -> list[str]:
    """Every ``fedrec`` command line of the docs' ```bash blocks, continuation lines joined and
    usage brackets (``[--out OUT]``, ``...``) dropped."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for part in line.split("&&"):
                    part = re.sub(r"[\[\]]|\.\.\.|…", " ", part).strip()
                    if part.startswith("fedrec "):
                        commands.append(part)
    return commands


def test_documented_commands_parse() -> None:
    """Every command the docs show is accepted by today's command line, its ``--set`` keys
    being run settings."""
    commands = documented_commands()
    assert len(commands) > 10 and any(c.startswith("fedrec audit") for c in commands)
    settings = {kebab(f.name) for f in fields(RunConfig)} | {"k", "key"}  # k=v: a placeholder
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit:
            pytest.fail(f"does not parse: {command}")
        overrides = [item.partition("=") for item in getattr(args, "overrides", None) or []]
        for key, _, _ in overrides:
            assert key in settings, f"{command}: no setting {key}"
        try:  # and each value is in its setting's range
            RunConfig.from_flat({k: v for k, _, v in overrides if k not in ("k", "key")})
        except ValueError as error:
            pytest.fail(f"{command}: {error}")


def test_readme_lists_every_command() -> None:
    """The README's table of commands has a row for every command of the CLI."""
    rows = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `fedrec ")
    ]
    for path, _ in COMMAND_PATHS:
        prefix = f"| `fedrec {path[0]}"
        assert any(
            row.startswith(prefix) and re.search(rf"\b{path[-1]}\b", row.split("` |")[0])
            for row in rows
        ), f"README.md's table has no row for fedrec {' '.join(path)}"


def documented_meanings() -> dict[str, str]:
    """setting -> what docs/configuration.md's table says it does."""
    meanings = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z0-9-]+)`", cells[0]):
                meanings[name] = "|".join(cells[2:])
    return meanings


def test_configuration_doc_lists_every_allowed_value() -> None:
    """Each setting that takes one of a few names lists every name the code accepts."""
    from server.federation.strategy import STRATEGIES
    from shared.data.partition import SCHEMES
    from simulations.attacks import ATTACKS

    meanings = documented_meanings()
    for setting, allowed in {
        **{kebab(name): names for name, names in CHOICES.items()},
        "strategy": tuple(STRATEGIES),
        "partition": SCHEMES,
        "attack": ATTACKS,
    }.items():
        named = set(re.findall(r"`([a-z0-9-]+)`", meanings[setting]))
        assert set(allowed) <= named, f"{setting}: {set(allowed) - named} undocumented"


def test_configuration_doc_states_every_range() -> None:
    """Each number setting's row states the range RunConfig refuses values outside of."""
    meanings = documented_meanings()
    for name, allowed in RANGES.items():
        assert str(allowed) in meanings[kebab(name)], f"{kebab(name)}: no {allowed!s}"
